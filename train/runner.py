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
import time
from pathlib import Path

from accelerate.utils import set_seed

from train.context import BEST_DIR, Context, keep_umask_modes, replace_dir
from train.export import export_final_models
from train.launch import build_context
from train.loop import evaluate_model, train_stage
from train.models import (
    distillation_loss,
    load_hf_model,
    load_student,
    model_size_bytes,
    new_student,
    read_quantization,
    save_hf_model,
    save_student,
    split_student,
)
from train.report import folder_bytes, write_report
from train.resume import finish_stage, remove_unneeded_models, start_partial
from train.stages import Stage


def _given_teacher_record(ctx: Context, path: str) -> dict:
    """The record of a teacher stage that evaluates the already fine-tuned ``--teacher_name_or_path``."""
    model = load_hf_model(ctx, path).to(ctx.accelerator.device)
    metrics = evaluate_model(ctx, model)
    return {"model": str(Path(path).resolve()) if Path(path).exists() else path, "metrics": metrics,
            "best_step": 0, "steps": 0, "tokens": 0, "train_seconds": 0.0, "tokens_per_second": 0.0,
            "size_bytes": model_size_bytes(model)}


def run_teacher(ctx: Context, stage: Stage) -> dict:
    """Stage 1: fine-tune the full-precision model (or evaluate ``--teacher_name_or_path``)."""
    args = ctx.args
    started = time.perf_counter()
    start_partial(ctx, stage)
    if args.teacher_name_or_path is not None:
        return finish_stage(ctx, stage, _given_teacher_record(ctx, args.teacher_name_or_path), started)
    model = load_hf_model(ctx, args.model_name_or_path)
    size = model_size_bytes(model)
    record = train_stage(
        ctx, stage, model,
        loss_fn=lambda outputs, teacher_outputs, batch: outputs.loss,
        save_model=lambda unwrapped, directory: save_hf_model(ctx, unwrapped, directory),
    )
    record.update(model=BEST_DIR, metrics=record["best_metrics"], size_bytes=size)
    return finish_stage(ctx, stage, record, started)


def teacher_model_path(ctx: Context) -> str:
    """Where the finished teacher stage's model is (its ``best/`` folder or ``--teacher_name_or_path``)."""
    done = ctx.done("teacher")
    if done is None:
        raise RuntimeError("the teacher stage has not finished; it must run before any student stage")
    model = done["model"]
    return str(ctx.stage_dir("teacher") / model) if model == BEST_DIR else model


def run_distill(ctx: Context, stage: Stage) -> dict:
    """Stages 2 and 4: distil a quantized student from the teacher (hidden states + attention, or logits)."""
    accelerator = ctx.accelerator
    if ctx.done(stage.init_from) is None:
        raise RuntimeError(f"stage {stage.name!r} starts from stage {stage.init_from!r}, which has not finished")
    init_dir = ctx.stage_dir(stage.init_from) / BEST_DIR
    init_quantization = None if stage.init_from == "teacher" else read_quantization(init_dir)
    started = time.perf_counter()
    start_partial(ctx, stage)
    set_seed(ctx.args.seed)
    teacher = load_hf_model(ctx, teacher_model_path(ctx), attn_implementation="eager")
    if init_quantization is None:
        student, quantization = new_student(ctx, stage, teacher_model_path(ctx))
    else:
        student, quantization = load_student(init_dir), init_quantization
    loss_fn, forward_kwargs = distillation_loss(stage.loss, teacher, student, quantization,
                                                ctx.spec.is_regression, accelerator.device)
    record = train_stage(
        ctx, stage, student, teacher=teacher, loss_fn=loss_fn, forward_kwargs=forward_kwargs,
        save_model=lambda unwrapped, directory: save_student(unwrapped, directory, quantization, ctx.tokenizer),
    )
    best = load_student(ctx.partial_dir(stage.name) / BEST_DIR)
    record.update(model=BEST_DIR, metrics=record["best_metrics"], size_bytes=model_size_bytes(best),
                  width=quantization.get("width", 1.0))
    accelerator.free_memory()
    return finish_stage(ctx, stage, record, started)


def run_split(ctx: Context, stage: Stage) -> dict:
    """Stage 3: ternary weight splitting of the finished ternary student into an equivalent binary one."""
    accelerator = ctx.accelerator
    ternary = ctx.done(stage.init_from)
    if ternary is None:
        raise RuntimeError(f"stage {stage.name!r} splits stage {stage.init_from!r}, which has not finished")
    started = time.perf_counter()
    partial = start_partial(ctx, stage)
    model, quantization = split_student(ctx.stage_dir(stage.init_from) / BEST_DIR)
    if accelerator.is_main_process:
        save_student(model, partial / f"{BEST_DIR}.tmp", quantization, ctx.tokenizer)
        replace_dir(partial / f"{BEST_DIR}.tmp", partial / BEST_DIR)
    accelerator.wait_for_everyone()
    # Evaluate the reloaded split model: it must match the ternary student it came from.
    model = load_student(partial / BEST_DIR)
    size = model_size_bytes(model)
    metrics = evaluate_model(ctx, model.to(accelerator.device))
    record = {"model": BEST_DIR, "metrics": metrics, "ternary_metrics": ternary["metrics"], "best_step": 0,
              "width": quantization.get("width", 1.0),
              "steps": 0, "tokens": 0, "train_seconds": 0.0, "tokens_per_second": 0.0, "size_bytes": size}
    return finish_stage(ctx, stage, record, started)


STAGE_RUNNERS = {"teacher": run_teacher, "distill": run_distill, "split": run_split}
STAGE_DETAILS = {"teacher": "fine-tune the full-precision model", "split": "ternary weight splitting"}


def stage_detail(stage: Stage) -> str:
    """What a stage does, for its header line."""
    if stage.kind == "distill":
        target = "hidden states and attention scores" if stage.loss == "hidden" else "logits"
        return f"W-E-A {stage.bits}, distil {target} from {stage.init_from}"
    return f"W-E-A {stage.bits}, {STAGE_DETAILS[stage.kind]}"


def tracker_config(ctx: Context) -> dict:
    """The run's settings for the trackers (scalars only: TensorBoard's hyperparameters take no ``None``)."""
    config = {**ctx.fingerprint(), "quant": ctx.args.quant, "act_bits": ctx.args.act_bits}
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
