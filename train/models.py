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
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from train.context import QUANT_FILE, Context, keep_umask_modes, write_json
from train.metrics import compute_metrics
from train.stages import Stage
from triton_bq import QuantConfig, attach_optimizer, load_second_moments, quantize_, save_packed, second_moments
from triton_bq.export.size import model_size_report, packed_size_bytes
from triton_bq.recipe.adaptive import choose_splits, measure_split_sensitivity, split_candidates, split_costs
from triton_bq.recipe.distill import attention_scores_loss, hidden_states_loss, logits_loss, record_attention_scores
from triton_bq.recipe.tws import split_ternary_to_binary
from triton_bq.recipe.width import kept_heads, shrink_width_, supports_width, taylor_importance, width_plan

# Training examples whose task-loss gradients rank the heads and FFN neurons a narrow ternary student keeps.
WIDTH_IMPORTANCE_EXAMPLES = 256
# The width stage's loss (DynaBERT): soft cross-entropy of the logits + this weight x MSE of the hidden states.
WIDTH_HIDDEN_WEIGHT = 0.1
# Loss-aware ternary layers' Adam second moments, saved beside a student's weights.
SECOND_MOMENTS_FILE = "second_moments.safetensors"
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


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


def size_parts(model: nn.Module) -> dict[str, dict[str, int]]:
    """The true stored bytes and the 1-bit / 2-bit weight counts of the encoder (the transformer layers), the
    word embedding and the rest (position / token-type embeddings, LayerNorms, pooler, classifier), so that "the
    same encoder size" can be read off. A model whose encoder or word embedding is not found counts it as rest."""
    base = model.base_model
    encoder = getattr(base, "encoder", None) or getattr(base, "transformer", None)
    parts = {}
    for part, module in (("encoder", encoder), ("word_embedding", model.get_input_embeddings())):
        name = _module_name(model, module)
        parts[part] = (f"{name}.",) if name else ()
    return model_size_report(model).by_part(parts, rest="rest")


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
    ``quantization.json``, the second moments of loss-aware ternary layers (``second_moments.safetensors``: without
    them the reloaded model would quantize with ``D = 1``) and the tokenizer when given."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    moments = second_moments(model)
    if moments:
        save_file({name: moment.detach().cpu().contiguous() for name, moment in moments.items()},
                  str(directory / SECOND_MOMENTS_FILE), metadata={"format": "pt"})
    write_json(directory / QUANT_FILE, quantization)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    keep_umask_modes(directory)


def save_packed_student(model: nn.Module, directory: Path) -> dict:
    """Export a quantized student as a packed Hugging Face folder (``triton_bq.save_packed``); returns its sizes."""
    sizes = save_packed(model, directory)
    keep_umask_modes(directory)
    return sizes


def load_student(directory: Path, **kwargs) -> nn.Module:
    """Rebuild a student saved by ``save_student``: same config, same narrowing, module swap (and split), same
    weights (and, for loss-aware ternary layers, the second moments they quantized with). ``kwargs`` go to
    ``from_config`` (e.g. ``attn_implementation="eager"``). A full-precision narrow model (the width stage's) has
    ``weight_method`` ``None``: it is narrowed, not quantized."""
    quantization = read_quantization(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    if quantization.get("width_plan"):
        shrink_width_(model, quantization["width_plan"])
    if quantization["weight_method"] is not None:
        quantize_(model, QuantConfig(weight_method=quantization["weight_method"], act_bits=quantization["act_bits"]))
    split = quantization.get("split")
    if split:
        split_ternary_to_binary(model, include=None if split is True else split)
    load_model(model, str(directory / "model.safetensors"), strict=True)
    moments = directory / SECOND_MOMENTS_FILE
    if moments.is_file():
        load_second_moments(model, load_file(str(moments)))
    return model


def training_examples(ctx: Context, batch_size: int) -> DataLoader:
    """The first ``WIDTH_IMPORTANCE_EXAMPLES`` training examples in order, padded per batch: the same on every
    process (what the width plan and adaptive splitting rank by, never the dev set)."""
    train = ctx.tokenized["train"]
    subset = train.select(range(min(WIDTH_IMPORTANCE_EXAMPLES, len(train))))
    return DataLoader(subset, batch_size=batch_size, collate_fn=DataCollatorWithPadding(ctx.tokenizer))


def width_importance(ctx: Context, model: nn.Module) -> dict:
    """Taylor importance of ``model``'s heads and FFN neurons (``triton_bq.recipe.width``) on the task loss of the first
    ``WIDTH_IMPORTANCE_EXAMPLES`` training examples in batches of the global batch size: the same batches, hence the
    same plan, on every process and for every process count on the same global batch."""
    loader = training_examples(ctx, ctx.args.per_device_train_batch_size * ctx.accelerator.num_processes)
    device = ctx.accelerator.device
    model.to(device)
    return taylor_importance(model, ({key: value.to(device) for key, value in batch.items()} for batch in loader))


def narrow_model(ctx: Context, teacher_path: str, width: float) -> tuple[nn.Module, dict]:
    """A full-precision copy of the teacher keeping ``width`` of its attention heads and FFN neurons (the most
    important by Taylor importance on training examples), and its ``quantization`` record (no quantizer)."""
    model = load_hf_model(ctx, teacher_path)
    if not supports_width(model, width):
        raise ValueError(f"--ternary_width {width} does not divide the teacher's attention heads and FFN neurons "
                         f"into whole heads and neurons; use another width or --ternary_width 1")
    plan = shrink_width_(model, width_plan(model, width, width_importance(ctx, model)))
    return model, {"weight_method": None, "act_bits": None, "split": False, "width": width, "width_plan": plan}


def new_student(ctx: Context, stage: Stage, init_path: Path | str, init_quantization: dict | None) -> tuple[nn.Module,
                                                                                                          dict]:
    """A quantized student for ``stage``: the teacher (``init_quantization`` ``None``) or a saved full-precision
    narrow model (the width stage's) with its layers swapped for quantized ones, and its ``quantization`` record."""
    if init_quantization is None:
        student = load_hf_model(ctx, init_path, attn_implementation="eager")
        width, plan = 1.0, None
    else:
        student = load_student(Path(init_path), attn_implementation="eager")
        width, plan = init_quantization["width"], init_quantization["width_plan"]
    quantize_(student, QuantConfig(weight_method=stage.weight_method, act_bits=stage.act_bits))
    quantization = {"weight_method": stage.weight_method, "act_bits": stage.act_bits, "split": False,
                    "width": width, "width_plan": plan}
    return student, quantization


def split_student(directory: Path, include: list[str] | None = None) -> tuple[nn.Module, dict]:
    """The ternary student saved in ``directory`` after ternary weight splitting (an equivalent binary model; with
    ``include``, only those modules split and the other ternary ones binarized), and its ``quantization`` record
    (``split``: ``True``, or the split module names)."""
    model = load_student(directory)
    split_ternary_to_binary(model, include=include)
    quantization = read_quantization(directory)
    quantization.update(split=True if include is None else sorted(include))
    return model, quantization


def optimizer_hook(student: nn.Module, weight_method: str | None):
    """What a stage does with its optimizer once built: loss-aware ternary students read its second moments."""
    if weight_method != "lat":
        return None
    return lambda optimizer: attach_optimizer(student, optimizer)


def quantize_bwn(model: nn.Module, act_bits: int) -> nn.Module:
    """``model`` binarized in place as the BWN-direct baseline is (for its size)."""
    quantize_(model, QuantConfig(weight_method="bwn", act_bits=act_bits))
    return model


def training_accuracy(ctx: Context, model: nn.Module) -> float:
    """The main metric of ``model`` on the first ``WIDTH_IMPORTANCE_EXAMPLES`` training examples (the same on every
    process): what adaptive splitting ranks its candidates by, so that the dev set never chooses the model."""
    loader = training_examples(ctx, ctx.args.per_device_eval_batch_size)
    device = ctx.accelerator.device
    model.to(device).eval()
    predictions, labels = [], []
    with torch.no_grad():
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits.float()
            predictions.append((logits.squeeze(-1) if ctx.spec.is_regression else logits.argmax(-1)).cpu())
            labels.append(batch["labels"].cpu())
    metrics = compute_metrics(ctx.spec.metrics, torch.cat(predictions).numpy(), torch.cat(labels).numpy())
    return float(metrics[ctx.spec.main_metric])


def adaptive_split(ctx: Context, directory: Path, total_bytes: int) -> list[str]:
    """The module names of the ternary student in ``directory`` to split so that the split model stores at most
    ``total_bytes`` (adaptive splitting: sensitivities on training examples, ``choose_splits``' knapsack)."""
    ternary = load_student(directory)
    binary_size = model_size_bytes(split_ternary_to_binary(load_student(directory), include=()))
    if total_bytes < binary_size:
        raise ValueError(f"--split_budget: {total_bytes / 1e6:.3f} MB is below the size of the model with no matrix "
                         f"split ({binary_size / 1e6:.3f} MB)")
    candidates = split_candidates(ternary)
    sensitivities = measure_split_sensitivity(lambda: load_student(directory), lambda model: training_accuracy(
        ctx, model), candidates)
    chosen = choose_splits(sensitivities, split_costs(ternary, candidates), total_bytes - binary_size)
    return [name for key in candidates if key in chosen for name in candidates[key]]


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


@dataclasses.dataclass
class WidthLoss:
    """The width stage's loss (DynaBERT's width-adaptive distillation, without the attention term): logits, plus
    ``WIDTH_HIDDEN_WEIGHT`` x the hidden states (the narrow model keeps the hidden size, so they compare)."""

    is_regression: bool

    def __call__(self, outputs, teacher_outputs, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = logits_loss(outputs.logits, teacher_outputs.logits, is_regression=self.is_regression)
        hidden = hidden_states_loss(outputs.hidden_states, teacher_outputs.hidden_states)
        return logits + WIDTH_HIDDEN_WEIGHT * hidden, {"logits": logits.detach(), "hidden": hidden.detach()}


def distillation_loss(
    loss: str, teacher: nn.Module, student: nn.Module, quantization: dict, is_regression: bool, device: torch.device,
    teacher_is_narrow: bool = False,
) -> tuple[HiddenStatesLoss | LogitsLoss | WidthLoss, dict]:
    """The loss of a distillation stage (``"width"``, ``"hidden"`` or ``"logits"``) and the forward keyword
    arguments it needs. ``teacher_is_narrow``: the teacher has the student's heads (the width stage's model)."""
    if loss == "width":
        return WidthLoss(is_regression), {"output_hidden_states": True}
    if loss != "hidden":
        return LogitsLoss(is_regression), {}
    teacher_attention = record_attention_scores(teacher)
    student_attention = record_attention_scores(student)
    # A narrower student taught by the full-width teacher is compared with the teacher's heads it kept.
    plan = None if teacher_is_narrow else quantization.get("width_plan")
    teacher_heads = [None] * len(teacher_attention) if not plan else [
        torch.tensor(heads, device=device) for heads in kept_heads(teacher, plan)
    ]
    return HiddenStatesLoss(teacher_attention, student_attention, teacher_heads), {"output_hidden_states": True}
