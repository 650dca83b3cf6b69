"""Resumability: starting, finishing, reusing and resuming a stage's folder under ``--output_dir``.

A stage trains in ``<stage>.partial/`` and is renamed to ``<stage>/`` when done (``finish_stage``), so a killed run
never loses a finished stage, and a rerun skips finished stages (``check_finished_stages``: their settings must
match). ``--resume_from_checkpoint latest`` (or a checkpoint path) continues a partial stage from a checkpoint;
without it a partial stage starts over (``start_partial``). With ``--keep_checkpoints needed`` the latent model
of an intermediate stage goes once every stage that starts from it has finished (``remove_unneeded_models``).
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from pathlib import Path

from train.context import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    DONE_FILE,
    PARTIAL_SUFFIX,
    TRAINER_STATE_FILE,
    Context,
    write_json,
)
from train.stages import Stage, needed_by


def latest_checkpoint(partial_dir: Path) -> Path | None:
    """The newest complete checkpoint (its trainer state is written last) of a partial stage."""
    root = partial_dir / CHECKPOINTS_DIR
    complete = [path for path in root.glob("step_*") if (path / TRAINER_STATE_FILE).is_file()] if root.is_dir() else []
    return max(complete, key=lambda path: int(path.name.removeprefix("step_")), default=None)


def resume_checkpoint(ctx: Context, stage: Stage) -> Path | None:
    """The checkpoint this stage resumes from (``--resume_from_checkpoint``), if any."""
    value = ctx.args.resume_from_checkpoint
    partial = ctx.partial_dir(stage.name)
    if value is None:
        return None
    if value == "latest":
        return latest_checkpoint(partial)
    path = Path(value).resolve()
    return path if path.parent.parent == partial.resolve() else None


def check_resume_argument(ctx: Context, stages: list[Stage]) -> None:
    """Reject a ``--resume_from_checkpoint`` path that is no complete checkpoint of an unfinished planned stage."""
    value = ctx.args.resume_from_checkpoint
    if value is None or value == "latest":
        return
    path = Path(value).resolve()
    owners = [s for s in stages if path.parent.parent == ctx.partial_dir(s.name).resolve()]
    if not owners or path.parent.name != CHECKPOINTS_DIR or not (path / TRAINER_STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {value!r} must be 'latest' or a complete checkpoint "
            f"<output_dir>/<stage>{PARTIAL_SUFFIX}/{CHECKPOINTS_DIR}/step_N of a stage this run trains "
            f"({', '.join(s.name for s in stages)})"
        )
    if ctx.done(owners[0].name) is not None:
        raise ValueError(f"--resume_from_checkpoint {value!r} belongs to stage {owners[0].name!r}, which is "
                         f"already finished")


def check_finished_stages(ctx: Context, stages: list[Stage]) -> None:
    """Reject reusing finished stages trained with other settings (before any training)."""
    current = ctx.fingerprint()
    for stage in stages:
        done = ctx.done(stage.name)
        if done is None:
            continue
        differences = [f"{key}: finished with {done['settings'].get(key)!r}, now {value!r}"
                       for key, value in current.items() if done["settings"].get(key) != value]
        if differences:
            raise ValueError(
                f"--output_dir {str(ctx.output_dir)!r} holds stage {stage.name!r} finished with other settings "
                f"({'; '.join(differences)}); use another --output_dir or delete {ctx.stage_dir(stage.name)}"
            )


def check_starting_points(ctx: Context, stages: list[Stage]) -> None:
    """Reject a plan whose unfinished stage starts from (or is taught by) a finished stage whose model was removed."""
    for stage in stages:
        if ctx.done(stage.name) is not None:
            continue
        for start, role in ((stage.init_from, "starts from"), (stage.teacher, "is taught by")):
            done = None if start is None else ctx.done(start)
            # A given model (--teacher_name_or_path, --width_name_or_path) lives outside the run folder.
            if done is None or done.get("model") != BEST_DIR:
                continue
            if not (ctx.stage_dir(start) / BEST_DIR).is_dir():
                raise ValueError(
                    f"stage {stage.name!r} {role} stage {start!r}, whose model {ctx.stage_dir(start) / BEST_DIR} "
                    f"was removed after the stages that needed it finished (--keep_checkpoints needed); delete "
                    f"{ctx.stage_dir(start)} to train it again, or use another --output_dir"
                )


def is_intermediate(stage: Stage) -> bool:
    """A stage whose model only starts another: the hidden-state sub-stage of a distillation, or the TWS split.

    The teacher and the logits sub-stage of every distillation hold the run's models (a later ``--quant binary``
    run in the same folder splits ``ternary_a*_logits``), so they are kept.
    """
    return stage.kind == "split" or stage.loss == "hidden"


def remove_unneeded_models(ctx: Context, stages: list[Stage]) -> list[Path]:
    """With ``--keep_checkpoints needed``, remove the ``best/`` of every finished intermediate stage
    (``is_intermediate``) all of whose planned followers have finished; returns the removed folders."""
    if ctx.args.keep_checkpoints == "all":
        return []
    removed = []
    for stage in stages:
        best = ctx.stage_dir(stage.name) / BEST_DIR
        followers = needed_by(stage, stages)
        if (not is_intermediate(stage) or ctx.done(stage.name) is None or not best.is_dir() or not followers
                or any(ctx.done(other.name) is None for other in followers)):
            continue
        if ctx.accelerator.is_main_process:
            shutil.rmtree(best)
        removed.append(best)
    ctx.accelerator.wait_for_everyone()
    return removed


def start_partial(ctx: Context, stage: Stage) -> Path:
    """Create (or, unless resuming, empty) the stage's working directory."""
    accelerator, partial = ctx.accelerator, ctx.partial_dir(stage.name)
    if accelerator.is_main_process:
        if ctx.stage_dir(stage.name).exists():
            # A stage directory without DONE.json was not written by a finished stage.
            shutil.rmtree(ctx.stage_dir(stage.name))
        if partial.exists() and resume_checkpoint(ctx, stage) is None:
            ctx.console.write(f"[{stage.name}] discarding the unfinished {partial} (pass --resume_from_checkpoint "
                              f"latest to continue it)")
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return partial


def finish_stage(ctx: Context, stage: Stage, record: dict, started: float) -> dict:
    """Write ``DONE.json`` and rename ``<stage>.partial`` to ``<stage>``: the stage is finished atomically."""
    accelerator = ctx.accelerator
    record = {
        "stage": stage.name,
        "kind": stage.kind,
        "bits": stage.bits,
        "main_metric": ctx.spec.main_metric,
        "wall_seconds": time.perf_counter() - started + record.pop("previous_wall_seconds", 0.0),
        "num_processes": accelerator.num_processes,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": ctx.fingerprint(),
        **record,
    }
    if accelerator.is_main_process:
        partial, final = ctx.partial_dir(stage.name), ctx.stage_dir(stage.name)
        write_json(partial / DONE_FILE, record)
        os.replace(partial, final)
        shutil.rmtree(final / CHECKPOINTS_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()
    return record
