"""The pipeline's models and their losses: everything ``train/`` asks of ``triton_bq``.

- The full-precision teacher: a Hugging Face sequence classifier, loaded and saved in Hugging Face format.
- Quantized students: a copy of the teacher, narrowed to ``--ternary_width`` of its attention heads and FFN
  neurons (``triton_bq.recipe.width``, the most important by first-order Taylor importance), with its layers swapped for
  quantized ones (``quantize_``); ternary weight splitting turns a ternary student into an equivalent binary one.
  A student is saved as its config, latent state dict (safetensors) and ``quantization.json`` (how to rebuild it).
- The distillation losses: hidden states with pre-softmax attention scores, or logits (``triton_bq.recipe.distill``).
- True model sizes (``triton_bq.export.size``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from train.context import QUANT_FILE, Context, keep_umask_modes, write_json
from train.stages import Stage
from triton_bq import QuantConfig, quantize_, save_packed
from triton_bq.export.size import packed_size_bytes
from triton_bq.recipe.distill import attention_scores_loss, hidden_states_loss, logits_loss, record_attention_scores
from triton_bq.recipe.tws import split_ternary_to_binary
from triton_bq.recipe.width import kept_heads, shrink_width_, supports_width, taylor_importance, width_plan

# Training examples whose task-loss gradients rank the heads and FFN neurons a narrow ternary student keeps.
WIDTH_IMPORTANCE_EXAMPLES = 256
# The logger of transformers' loading report (MISSING / UNEXPECTED / MISMATCH keys of from_pretrained).
LOADING_LOGGER = "transformers.modeling_utils"


class _HeldLoadingReport(logging.Filter):
    """Holds back transformers' loading report (and lets every other record through), to log it only if it
    reports more than a new classification head."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        logger = logging.getLogger(LOADING_LOGGER)
        for record in self.records:
            logger.handle(record)


def model_size_bytes(model: nn.Module) -> int:
    """The true stored size of ``model``: packed low-bit weights, fp32 scales and full-precision rest."""
    return packed_size_bytes(model)


def save_hf_model(ctx: Context, model: nn.Module, directory: Path) -> None:
    """Save a full-precision model and the tokenizer in Hugging Face format (main process only)."""
    model.save_pretrained(directory, safe_serialization=True)
    ctx.tokenizer.save_pretrained(directory)
    keep_umask_modes(directory)


def load_hf_model(ctx: Context, path: str | Path, **kwargs) -> nn.Module:
    """A full-precision sequence classifier for the task, from a hub name or folder.

    A pretrained model without a classification head gets a new one: transformers' loading report of the head's
    MISSING keys is expected then and not shown. Any other report (a missing key of the base model, unexpected or
    mismatched keys) is logged as transformers logs it.
    """
    spec = ctx.spec
    labels = {}
    if spec.label_names is not None:
        labels = dict(id2label=dict(enumerate(spec.label_names)),
                      label2id={name: index for index, name in enumerate(spec.label_names)})
    logger, held = logging.getLogger(LOADING_LOGGER), _HeldLoadingReport()
    logger.addFilter(held)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=spec.num_labels, output_loading_info=True,
            problem_type="regression" if spec.is_regression else "single_label_classification", **labels, **kwargs,
        )
    except Exception:
        # The report explains the error (mismatched sizes, conversion errors).
        logger.removeFilter(held)
        held.release()
        raise
    logger.removeFilter(held)
    prefix = model.base_model_prefix + "."
    only_new_head = (all(not key.startswith(prefix) for key in info["missing_keys"])
                     and not info["unexpected_keys"] and not info["mismatched_keys"])
    if not only_new_head:
        held.release()
    return model


def read_quantization(directory: Path) -> dict:
    """The ``quantization.json`` of a student saved by ``save_student``."""
    return json.loads((directory / QUANT_FILE).read_text())


def save_student(model: nn.Module, directory: Path, quantization: dict, tokenizer=None) -> None:
    """Save a quantized student: its config (with the quantized structure as its ``quantization_config``, so that
    after ``import triton_bq`` the folder loads with ``from_pretrained``), latent state dict (safetensors),
    ``quantization.json`` and the tokenizer when given."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_json(directory / QUANT_FILE, quantization)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    keep_umask_modes(directory)


def save_packed_student(model: nn.Module, directory: Path) -> dict:
    """Export a quantized student as a packed Hugging Face folder (``triton_bq.save_packed``); returns its sizes."""
    sizes = save_packed(model, directory)
    keep_umask_modes(directory)
    return sizes


def load_student(directory: Path) -> nn.Module:
    """Rebuild a student saved by ``save_student``: same config, same module swap (and split), same weights."""
    quantization = read_quantization(directory)
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
    """Taylor importance of ``model``'s heads and FFN neurons (``triton_bq.recipe.width``) on the task loss of the first
    ``WIDTH_IMPORTANCE_EXAMPLES`` training examples in batches of the global batch size: the same batches, hence the
    same plan, on every process and for every process count on the same global batch."""
    train = ctx.tokenized["train"]
    subset = train.select(range(min(WIDTH_IMPORTANCE_EXAMPLES, len(train))))
    batch_size = ctx.args.per_device_train_batch_size * ctx.accelerator.num_processes
    loader = DataLoader(subset, batch_size=batch_size,
                        collate_fn=DataCollatorWithPadding(ctx.tokenizer))
    device = ctx.accelerator.device
    model.to(device)
    return taylor_importance(model, ({key: value.to(device) for key, value in batch.items()} for batch in loader))


def new_student(ctx: Context, stage: Stage, teacher_path: str) -> tuple[nn.Module, dict]:
    """A quantized copy of the teacher for ``stage`` (a ternary one narrowed to ``--ternary_width`` when the
    teacher's layers divide), and its ``quantization`` record."""
    args = ctx.args
    student = load_hf_model(ctx, teacher_path, attn_implementation="eager")
    width, plan = 1.0, None
    if stage.weight_method == "twn" and args.ternary_width < 1:
        if supports_width(student, args.ternary_width):
            importance = width_importance(ctx, student)
            width = args.ternary_width
            plan = shrink_width_(student, width_plan(student, width, importance))
        else:
            ctx.console.write(f"[{stage.name}] the teacher's layers do not divide at --ternary_width "
                              f"{args.ternary_width}: the ternary student keeps the full width")
    quantize_(student, QuantConfig(weight_method=stage.weight_method, act_bits=args.act_bits))
    quantization = {"weight_method": stage.weight_method, "act_bits": args.act_bits, "split": False,
                    "width": width, "width_plan": plan}
    return student, quantization


def split_student(directory: Path) -> tuple[nn.Module, dict]:
    """The ternary student saved in ``directory`` after ternary weight splitting (an equivalent binary model), and
    its ``quantization`` record."""
    model = load_student(directory)
    split_ternary_to_binary(model)
    quantization = read_quantization(directory)
    quantization.update(split=True)
    return model, quantization


@dataclasses.dataclass
class HiddenStatesLoss:
    """Distillation on hidden states and pre-softmax attention scores (the first sub-stage of each student).

    ``teacher_heads`` holds, per layer, the indices of the teacher's heads a narrower student kept (``None``: all).
    """

    teacher_attention: list
    student_attention: list
    teacher_heads: list

    def __call__(self, outputs, teacher_outputs, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = hidden_states_loss(outputs.hidden_states, teacher_outputs.hidden_states)
        teacher_scores = [module.scores if heads is None else module.scores.index_select(1, heads)
                          for module, heads in zip(self.teacher_attention, self.teacher_heads, strict=True)]
        attention = attention_scores_loss([module.scores for module in self.student_attention], teacher_scores)
        return hidden + attention, {"hidden": hidden.detach(), "attention": attention.detach()}


@dataclasses.dataclass
class LogitsLoss:
    """Distillation on the logits (the second sub-stage of each student)."""

    is_regression: bool

    def __call__(self, outputs, teacher_outputs, batch: dict) -> torch.Tensor:
        return logits_loss(outputs.logits, teacher_outputs.logits, is_regression=self.is_regression)


def distillation_loss(
    loss: str, teacher: nn.Module, student: nn.Module, quantization: dict, is_regression: bool, device: torch.device
) -> tuple[HiddenStatesLoss | LogitsLoss, dict]:
    """The loss of a distillation stage (``"hidden"`` or ``"logits"``) and the forward keyword arguments it needs."""
    if loss != "hidden":
        return LogitsLoss(is_regression), {}
    teacher_attention = record_attention_scores(teacher)
    student_attention = record_attention_scores(student)
    # A narrower student is compared with the teacher's heads it kept.
    plan = quantization.get("width_plan")
    teacher_heads = [None] * len(teacher_attention) if not plan else [
        torch.tensor(heads, device=device) for heads in kept_heads(teacher, plan)
    ]
    return HiddenStatesLoss(teacher_attention, student_attention, teacher_heads), {"output_hidden_states": True}
