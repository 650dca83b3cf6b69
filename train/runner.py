"""Running the pipeline: what each kind of stage does, and the run of every planned stage then the report.

- ``run_teacher``: fine-tune the full-precision model on the task (or evaluate ``--teacher_name_or_path``).
- ``run_distill``: distil a quantized student from the teacher, on hidden states and attention scores or on
  logits, starting from the teacher or from the best model of an earlier stage.
- ``run_split``: ternary weight splitting of the finished ternary student into an equivalent binary one.

Every stage re-seeds with ``--seed`` before it starts, so a resumed pipeline trains the same models. After each
stage the models no later stage needs are removed (``--keep_checkpoints``); the run ends with the report and the
size of the run folder.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed
from torch import nn

from train.context import BEST_DIR, PREDICTIONS_FILE, Context, keep_umask_modes, replace_dir, write_json
from train.export import export_final_models
from train.launch import build_context
from train.loop import predict_model, train_stage
from train.models import (
    adaptive_split,
    distillation_loss,
    load_hf_model,
    load_student,
    model_size_bytes,
    narrow_model,
    new_student,
    optimizer_hook,
    quantize_bwn,
    read_quantization,
    save_hf_model,
    save_student,
    size_parts,
    split_student,
)
from train.options import check_args
from train.report import folder_bytes, write_report
from train.resume import finish_stage, remove_unneeded_models, start_partial
from train.seeds import aggregate_seeds, format_seeds_report, parse_seeds, seed_dir
from train.stages import Stage, has_width_stage


def write_predictions(ctx: Context, stage: Stage, predictions: dict) -> None:
    """The stage's dev predictions, ``<stage>.partial/predictions.json`` (main process)."""
    if ctx.accelerator.is_main_process:
        write_json(ctx.partial_dir(stage.name) / PREDICTIONS_FILE, predictions)


def copy_best_predictions(ctx: Context, stage: Stage) -> None:
    """A trained stage's predictions are its best checkpoint's (saved beside it): keep them at the stage's level,
    where they stay when an intermediate ``best/`` is removed."""
    partial = ctx.partial_dir(stage.name)
    if ctx.accelerator.is_main_process:
        shutil.copyfile(partial / BEST_DIR / PREDICTIONS_FILE, partial / PREDICTIONS_FILE)


def _given_record(ctx: Context, stage: Stage, path: str, model: nn.Module) -> dict:
    """The record of a stage that evaluates an already trained model (``--teacher_name_or_path``,
    ``--width_name_or_path``) instead of training one."""
    metrics, predictions = predict_model(ctx, model.to(ctx.accelerator.device))
    write_predictions(ctx, stage, predictions)
    return {"model": str(Path(path).resolve()) if Path(path).exists() else path, "metrics": metrics,
            "best_step": 0, "steps": 0, "tokens": 0, "train_seconds": 0.0, "tokens_per_second": 0.0,
            "size_bytes": model_size_bytes(model), "size_parts": size_parts(model)}


def run_teacher(ctx: Context, stage: Stage) -> dict:
    """Stage 1: fine-tune the full-precision model (or evaluate ``--teacher_name_or_path``)."""
    args = ctx.args
    started = time.perf_counter()
    start_partial(ctx, stage)
    if args.teacher_name_or_path is not None:
        model = load_hf_model(ctx, args.teacher_name_or_path)
        return finish_stage(ctx, stage, _given_record(ctx, stage, args.teacher_name_or_path, model), started)
    model = load_hf_model(ctx, args.model_name_or_path)
    size, parts = model_size_bytes(model), size_parts(model)
    record = train_stage(
        ctx, stage, model,
        loss_fn=lambda outputs, teacher_outputs, batch: outputs.loss,
        save_model=lambda unwrapped, directory: save_hf_model(ctx, unwrapped, directory),
    )
    copy_best_predictions(ctx, stage)
    record.update(model=BEST_DIR, metrics=record["best_metrics"], size_bytes=size, size_parts=parts)
    return finish_stage(ctx, stage, record, started)


def stage_model_path(ctx: Context, name: str) -> str:
    """Where a finished stage's model is (its ``best/`` folder, or the given ``--teacher_name_or_path`` /
    ``--width_name_or_path``)."""
    done = ctx.done(name)
    if done is None:
        raise RuntimeError(f"the {name} stage has not finished; it must run before the stages that use its model")
    model = done["model"]
    return str(ctx.stage_dir(name) / model) if model == BEST_DIR else model


def teacher_model_path(ctx: Context) -> str:
    """Where the finished teacher stage's model is (its ``best/`` folder or ``--teacher_name_or_path``)."""
    return stage_model_path(ctx, "teacher")


def load_teacher(ctx: Context, stage: Stage) -> nn.Module:
    """The frozen teacher of a distillation stage (eager attention, whose scores the hidden-state loss reads): the
    full-width teacher or the width stage's narrow model."""
    path = stage_model_path(ctx, stage.teacher)
    if stage.teacher == "teacher":
        return load_hf_model(ctx, path, attn_implementation="eager")
    return load_student(Path(path), attn_implementation="eager")


def finish_student_stage(ctx: Context, stage: Stage, record: dict, quantization: dict, started: float) -> dict:
    """Finish a trained student stage (width or distillation): its best model's predictions, metrics, size by part
    and width go into the record, and the stage is finished."""
    copy_best_predictions(ctx, stage)
    best = load_student(ctx.partial_dir(stage.name) / BEST_DIR)
    record.update(model=BEST_DIR, metrics=record["best_metrics"], size_bytes=model_size_bytes(best),
                  size_parts=size_parts(best), width=quantization.get("width", 1.0))
    ctx.accelerator.free_memory()
    return finish_stage(ctx, stage, record, started)


def run_width(ctx: Context, stage: Stage) -> dict:
    """The width stage: a full-precision copy of the teacher narrowed to ``--ternary_width`` (Taylor importance on
    training examples), distilled from the full-width teacher on logits and hidden states (DynaBERT), or the given
    ``--width_name_or_path`` evaluated."""
    args = ctx.args
    started = time.perf_counter()
    start_partial(ctx, stage)
    if args.width_name_or_path is not None:
        model = load_student(Path(args.width_name_or_path))
        record = _given_record(ctx, stage, args.width_name_or_path, model)
        record.update(width=read_quantization(Path(args.width_name_or_path))["width"])
        return finish_stage(ctx, stage, record, started)
    set_seed(args.seed)
    teacher = load_teacher(ctx, stage)
    model, quantization = narrow_model(ctx, teacher_model_path(ctx), args.ternary_width)
    loss_fn, forward_kwargs = distillation_loss(stage.loss, teacher, model, quantization, ctx.spec.is_regression,
                                                ctx.accelerator.device)
    record = train_stage(
        ctx, stage, model, teacher=teacher, loss_fn=loss_fn, forward_kwargs=forward_kwargs,
        save_model=lambda unwrapped, directory: save_student(unwrapped, directory, quantization, ctx.tokenizer),
    )
    return finish_student_stage(ctx, stage, record, quantization, started)


def run_distill(ctx: Context, stage: Stage) -> dict:
    """Stages 2 and 4: distil a quantized student from its teacher (hidden states + attention, or logits)."""
    accelerator = ctx.accelerator
    if ctx.done(stage.init_from) is None:
        raise RuntimeError(f"stage {stage.name!r} starts from stage {stage.init_from!r}, which has not finished")
    init_path = stage_model_path(ctx, stage.init_from)
    init_quantization = None if stage.init_from == "teacher" else read_quantization(Path(init_path))
    started = time.perf_counter()
    start_partial(ctx, stage)
    set_seed(ctx.args.seed)
    teacher = load_teacher(ctx, stage)
    if init_quantization is None or init_quantization["weight_method"] is None:
        student, quantization = new_student(ctx, stage, init_path, init_quantization)
    else:
        student, quantization = load_student(Path(init_path)), init_quantization
    loss_fn, forward_kwargs = distillation_loss(stage.loss, teacher, student, quantization,
                                                ctx.spec.is_regression, accelerator.device,
                                                teacher_is_narrow=stage.teacher == "width")
    record = train_stage(
        ctx, stage, student, teacher=teacher, loss_fn=loss_fn, forward_kwargs=forward_kwargs,
        save_model=lambda unwrapped, directory: save_student(unwrapped, directory, quantization, ctx.tokenizer),
        optimizer_hook=optimizer_hook(student, stage.weight_method),
    )
    return finish_student_stage(ctx, stage, record, quantization, started)


def run_split(ctx: Context, stage: Stage) -> dict:
    """Stage 3: ternary weight splitting of the finished ternary student into an equivalent binary one (under
    ``--split_budget``, of the most sensitive matrices only: the rest is binarized)."""
    accelerator = ctx.accelerator
    ternary = ctx.done(stage.init_from)
    if ternary is None:
        raise RuntimeError(f"stage {stage.name!r} splits stage {stage.init_from!r}, which has not finished")
    started = time.perf_counter()
    partial = start_partial(ctx, stage)
    include, budget = split_selection(ctx, stage)
    model, quantization = split_student(ctx.stage_dir(stage.init_from) / BEST_DIR, include)
    if accelerator.is_main_process:
        save_student(model, partial / f"{BEST_DIR}.tmp", quantization, ctx.tokenizer)
        replace_dir(partial / f"{BEST_DIR}.tmp", partial / BEST_DIR)
    accelerator.wait_for_everyone()
    # Evaluate the reloaded split model: unbudgeted, it must match the ternary student it came from.
    model = load_student(partial / BEST_DIR)
    size = model_size_bytes(model)
    metrics, predictions = predict_model(ctx, model.to(accelerator.device))
    write_predictions(ctx, stage, predictions)
    record = {"model": BEST_DIR, "metrics": metrics, "ternary_metrics": ternary["metrics"], "best_step": 0,
              "width": quantization.get("width", 1.0), "split_budget_bytes": budget,
              "split": quantization["split"], "steps": 0, "tokens": 0, "train_seconds": 0.0,
              "tokens_per_second": 0.0, "size_bytes": size, "size_parts": size_parts(model)}
    return finish_stage(ctx, stage, record, started)


def split_selection(ctx: Context, stage: Stage) -> tuple[list[str] | None, int | None]:
    """The module names TWS splits under ``--split_budget`` and the budget in bytes (``None, None``: no budget,
    split all). Sensitivities are measured on training examples (never the dev set)."""
    budget = ctx.args.split_budget
    if budget == "none":
        return None, None
    if budget == "bwn":
        teacher = load_hf_model(ctx, teacher_model_path(ctx))
        quantize_bwn(teacher, stage.act_bits)
        total = model_size_bytes(teacher)
    else:
        total = round(budget * 1e6)
    names = adaptive_split(ctx, ctx.stage_dir(stage.init_from) / BEST_DIR, total)
    ctx.console.write(f"[{stage.name}] --split_budget {budget}: {total / 1e6:.3f} MB; splitting {len(names)} "
                      f"module(s), binarizing the other ternary ones")
    return names, total


STAGE_RUNNERS = {"teacher": run_teacher, "width": run_width, "distill": run_distill, "split": run_split}
STAGE_DETAILS = {"teacher": "fine-tune the full-precision model", "split": "ternary weight splitting",
                 "width": "narrow the teacher and distil logits and hidden states from it (full precision)"}


def stage_detail(stage: Stage) -> str:
    """What a stage does, for its header line."""
    if stage.kind == "distill":
        target = "hidden states and attention scores" if stage.loss == "hidden" else "logits"
        source = stage.init_from if stage.init_from == stage.teacher else f"{stage.teacher}, from {stage.init_from}"
        return f"W-E-A {stage.bits}, distil {target} from {source}"
    return f"W-E-A {stage.bits}, {STAGE_DETAILS[stage.kind]}"


def tracker_config(ctx: Context) -> dict:
    """The run's settings for the trackers (scalars only: TensorBoard's hyperparameters take no ``None``)."""
    config = {**ctx.fingerprint(), "quant": ctx.args.quant, "act_bits": ",".join(map(str, ctx.args.act_bits))}
    return {key: value if isinstance(value, int | float | str | bool) else str(value) for key, value in config.items()}


def run_pipeline(args: argparse.Namespace) -> dict:
    """Run every planned stage that has not finished, then the report; returns the report."""
    run_start = time.perf_counter()
    ctx, stages = build_context(args)
    accelerator, spec, console = ctx.accelerator, ctx.spec, ctx.console
    console.write(
        f"task {spec.name} from {ctx.source}: {len(ctx.tokenized['train'])} train / "
        f"{len(ctx.tokenized['validation'])} dev examples, max length {args.max_seq_length}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}; stages {[s.name for s in stages]}"
    )
    if args.report_to:
        accelerator.init_trackers(f"triton_bq_{spec.name}", config=tracker_config(ctx))
    for stage in stages:
        if ctx.done(stage.name) is not None:
            console.mark_finished(stage.name)
            console.write(f"[{stage.name}] finished earlier, skipped")
            continue
        set_seed(args.seed)
        console.start_stage(stage.name, stage_detail(stage))
        record = STAGE_RUNNERS[stage.kind](ctx, stage)
        console.mark_finished(stage.name)
        console.write(f"[{stage.name}] done: dev {spec.main_metric} {record['metrics'][spec.main_metric]:.4f}, "
                      f"{record['wall_seconds']:.0f} s")
        for removed in remove_unneeded_models(ctx, stages):
            console.write(f"[{stage.name}] removed {removed} (no planned stage starts from it any more; "
                          f"--keep_checkpoints all keeps it)")
    export_final_models(ctx, stages)
    if accelerator.is_main_process:
        keep_umask_modes(ctx.output_dir)
    report = write_report(ctx, stages, time.perf_counter() - run_start)
    if args.report_to:
        accelerator.end_training()
    console.write(f"{ctx.output_dir} holds {folder_bytes(ctx.output_dir) / 1e6:.1f} MB")
    return report


def seed_args(args: argparse.Namespace, seed: int, first: int) -> argparse.Namespace:
    """The options of one seed's run: the first seed's in ``--output_dir``; any other in ``<output_dir>/seed_<s>``
    with the first run's teacher and width model given (the seeds vary the quantized stages, not their teachers)."""
    run = copy.copy(args)
    run.seed, run.seeds = seed, None
    if seed == first:
        return run
    base = Path(args.output_dir)
    run.output_dir = str(seed_dir(base, seed, first))
    if args.teacher_name_or_path is None:
        run.teacher_name_or_path = str(base / "teacher" / BEST_DIR)
    if has_width_stage(args) and args.width_name_or_path is None:
        run.width_name_or_path = str(base / "width" / BEST_DIR)
    return run


def run_seeds(args: argparse.Namespace) -> dict:
    """``--seeds``: the pipeline once per seed, then the seeds report (``train/seeds.py``): every stage's mean and
    std over seeds, and the paired test of each TWS binary model against its BWN baseline. Returns its summary."""
    seeds = parse_seeds(args.seeds)
    check_args(args)
    run_dirs = {}
    for seed in seeds:
        run = seed_args(args, seed, seeds[0])
        run_pipeline(run)
        run_dirs[seed] = Path(run.output_dir)
    summary = None
    state = PartialState()
    if state.is_main_process:
        summary = aggregate_seeds(run_dirs, Path(args.output_dir))
        print(format_seeds_report(summary), flush=True)
    state.wait_for_everyone()
    return summary
