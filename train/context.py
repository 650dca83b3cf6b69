"""What every stage shares (``Context``), and the names and atomic writes of what a run keeps on disk.

Under ``--output_dir`` a finished stage is a folder ``<stage>/`` holding ``DONE.json`` (its record),
``history.jsonl`` and its best model ``best/`` (removed from intermediate stages once no stage needs it); a stage
in progress works in ``<stage>.partial/``, with resumable checkpoints in ``checkpoints/step_N/`` (each ends with
``trainer_state.json``). Files are written to a temporary name and renamed, so a killed run never leaves a
half-written one. Saved files get the mode the umask gives (``keep_umask_modes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import transformers
from accelerate import Accelerator

from train.console import Console
from train.data import TaskSpec

DONE_FILE = "DONE.json"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
BEST_STATE_FILE = "best_state.json"
QUANT_FILE = "quantization.json"
# A stage's dev predictions (labels and predictions in dev-set order), for the paired tests over seeds.
PREDICTIONS_FILE = "predictions.json"
PARTIAL_SUFFIX = ".partial"
# Where the experiment trackers of --report_to log (TensorBoard event files, ...).
TRACKERS_DIR = "trackers"
# Settings that change what a stage computes: a finished stage is reused only when they match.
FINGERPRINT_KEYS = (
    "task", "model_name_or_path", "teacher_name_or_path", "train_file", "validation_file", "text_columns",
    "label_column", "max_seq_length", "max_train_samples", "max_eval_samples", "num_train_epochs", "learning_rate",
    "ternary_learning_rate", "binary_learning_rate", "hidden_lr_multiplier", "per_device_train_batch_size",
    "weight_decay", "warmup_ratio", "max_grad_norm", "evals_per_epoch", "seed", "data_seed", "mixed_precision",
    "ternary_width", "ternary_teacher", "weight_method", "width_name_or_path", "split_budget",
)


@dataclasses.dataclass
class Context:
    """What every stage shares: the accelerator, options, task, tokenizer, tokenized data, output folder and the
    console."""

    accelerator: Accelerator
    args: argparse.Namespace
    spec: TaskSpec
    tokenizer: transformers.PreTrainedTokenizerBase
    tokenized: dict
    output_dir: Path
    source: str
    console: Console

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / name

    def partial_dir(self, name: str) -> Path:
        return self.output_dir / f"{name}{PARTIAL_SUFFIX}"

    def done(self, name: str) -> dict | None:
        path = self.stage_dir(name) / DONE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def fingerprint(self) -> dict:
        return {key: getattr(self.args, key) for key in FINGERPRINT_KEYS}


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically (temporary file, then rename)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)


def replace_dir(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``, replacing it; at every instant one complete copy exists on disk."""
    old = destination.with_name(destination.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        os.replace(destination, old)
    os.replace(source, destination)
    if old.exists():
        shutil.rmtree(old)


def keep_umask_modes(root: Path) -> None:
    """Give every file and folder under ``root`` (and ``root``) the mode the process's umask gives new ones.

    safetensors writes its files with mode 0600 whatever the umask (a temporary file renamed into place), so the
    weights that ``save_pretrained``, ``safetensors.torch.save_model`` and ``accelerator.save_state`` write would
    not be readable by the group or others that can read every other file of the run.
    """
    umask = os.umask(0)
    os.umask(umask)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink() or not path.exists():
            continue
        mode = (0o777 if path.is_dir() else 0o666) & ~umask
        # Keep execute bits a file was given on purpose; only read/write bits follow the umask.
        if not path.is_dir():
            mode |= path.stat().st_mode & 0o111 & ~umask
        if path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)
