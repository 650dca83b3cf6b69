"""Resumability: starting, finishing, reusing and resuming a stage's folder under ``--output_dir``.

A stage trains in ``<stage>.partial/`` and is renamed to ``<stage>/`` when done (``finish_stage``), so a killed run
never loses a finished stage, and a rerun skips finished stages (``check_finished_stages``: their settings must
match). ``--resume_from_checkpoint latest`` (or a checkpoint path) continues a partial stage from a checkpoint;
without it a partial stage starts over (``start_partial``).
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from pathlib import Path

from train.context import CHECKPOINTS_DIR, DONE_FILE, PARTIAL_SUFFIX, TRAINER_STATE_FILE, Context, write_json
from train.stages import Stage


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


def start_partial(ctx: Context, stage: Stage) -> Path:
    """Create (or, unless resuming, empty) the stage's working directory."""
    accelerator, partial = ctx.accelerator, ctx.partial_dir(stage.name)
    if accelerator.is_main_process:
        if ctx.stage_dir(stage.name).exists():
            # A stage directory without DONE.json was not written by a finished stage.
            shutil.rmtree(ctx.stage_dir(stage.name))
        if partial.exists() and resume_checkpoint(ctx, stage) is None:
            accelerator.print(f"[{stage.name}] discarding the unfinished {partial} (pass --resume_from_checkpoint "
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
