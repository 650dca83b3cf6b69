"""Distillation losses of TernaryBERT / BinaryBERT: hidden states, pre-softmax attention scores, logits.

With ``L`` Transformer layers, student ``s`` and teacher ``t`` (same depth, head count and width):

- hidden states (``output_hidden_states=True``: the embedding output and every layer output, ``L + 1`` tensors
  ``[B, S, H]``): ``sum_l MSE(s_l, t_l)``;
- attention scores (pre-softmax ``Q K^T / sqrt(d)``, ``L`` tensors ``[B, heads, S, S]``, masked key positions set to
  0 in both): ``sum_l MSE(s_l, t_l)``;
- logits: soft cross-entropy ``-(softmax(t / T) * log_softmax(s / T)).sum(-1).mean()`` for classification, or
  ``MSE(s, t)`` for regression (one output, STS-B).

``MSE`` is the mean over all elements (the reference code), so padded positions count with their values (hidden
states) or as zeros (masked keys). ``mask_padding=True`` averages over real tokens only instead: over ``(b, i)``
with ``mask[b, i] = 1`` for hidden states and over ``(b, head, i, j)`` with ``mask[b, i] = mask[b, j] = 1`` for
scores. The reference recipe trains stage 1 on ``hidden + attention`` and stage 2 on ``logits``; the BinaryBERT
reference's ``soft_cross_entropy`` takes ``.mean()`` over batch and classes, i.e. this loss divided by the number
of classes. No ``T^2`` factor.

Scores are recorded by ``triton_bq.attention`` (``record_scores``): ``record_attention_scores(model)`` turns it on
(swapping full-precision BERT self-attention, e.g. a teacher's, to the eager class with ``act_bits=None``: same
math), and ``capture_attention_scores(model)`` does the same for the duration of a ``with`` block.

Typical stage-1 step::

    loss_fn = DistillationLoss(hidden_weight=1.0, attention_weight=1.0, logits_weight=0.0)
    with capture_attention_scores(student) as student_scores, capture_attention_scores(teacher) as teacher_scores:
        with torch.no_grad():
            teacher_outputs = teacher(**batch, output_hidden_states=True)
        student_outputs = student(**batch, output_hidden_states=True)
        loss, parts = loss_fn(student_outputs, teacher_outputs, student_scores.scores, teacher_scores.scores,
                              batch["attention_mask"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from triton_bq.nn.attention import (
    QuantSelfAttentionMixin,
    dequantize_attention,
    is_bert_self_attention,
    quantize_attention,
)

__all__ = [
    "hidden_states_loss",
    "attention_scores_loss",
    "soft_cross_entropy",
    "logits_loss",
    "distill_loss",
    "DistillationLoss",
    "record_attention_scores",
    "AttentionScoreRecorder",
    "capture_attention_scores",
]


def _check_pairs(name: str, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> None:
    if len(student) != len(teacher) or len(student) == 0:
        raise ValueError(f"{name}: student and teacher must give the same non-zero number of tensors, got "
                         f"{len(student)} and {len(teacher)}")
    for index, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.shape != t.shape:
            raise ValueError(f"{name}[{index}]: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}")


def _token_mask(attention_mask: torch.Tensor, batch: int, length: int, name: str) -> torch.Tensor:
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must have shape ({batch}, {length}) for {name}, got "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask != 0


def hidden_states_loss(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    *,
    mask_padding: bool = False,
) -> torch.Tensor:
    """``sum_l MSE(s_l, t_l)`` over the hidden states (embedding output and each layer output, ``[B, S, H]``).

    ``mask_padding=True`` (needs ``attention_mask [B, S]``): each term is
    ``sum_{b,i: mask=1} ||s_l[b,i] - t_l[b,i]||^2 / (H * #{mask=1})``. The teacher side is detached.
    """
    _check_pairs("hidden_states", student_hidden_states, teacher_hidden_states)
    if mask_padding and attention_mask is None:
        raise ValueError("mask_padding=True needs attention_mask")
    total = student_hidden_states[0].new_zeros((), dtype=torch.float32)
    for student, teacher in zip(student_hidden_states, teacher_hidden_states, strict=True):
        difference = student.float() - teacher.detach().float()
        if mask_padding:
            keep = _token_mask(attention_mask, difference.shape[0], difference.shape[1], "hidden states")
            squared = difference.square().sum(-1)
            total = total + squared[keep].sum() / (keep.sum() * difference.shape[-1]).clamp_min(1)
        else:
            total = total + difference.square().mean()
    return total


def attention_scores_loss(
    student_scores: Sequence[torch.Tensor],
    teacher_scores: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    *,
    mask_padding: bool = False,
) -> torch.Tensor:
    """``sum_l MSE(s_l, t_l)`` over pre-softmax attention scores ``[B, heads, S, S]``, masked keys zeroed in both.

    With ``attention_mask [B, S]``, key positions ``j`` with ``mask[b, j] = 0`` are set to 0 in both (the recorded
    scores already are). ``mask_padding=True`` also drops padded query rows and averages over the
    ``heads * sum_b n_b^2`` real (query, key) pairs. The teacher side is detached.
    """
    _check_pairs("attention_scores", student_scores, teacher_scores)
    if mask_padding and attention_mask is None:
        raise ValueError("mask_padding=True needs attention_mask")
    total = student_scores[0].new_zeros((), dtype=torch.float32)
    for student, teacher in zip(student_scores, teacher_scores, strict=True):
        if student.dim() != 4 or student.shape[-1] != student.shape[-2]:
            raise ValueError(f"attention scores must be [B, heads, S, S], got shape {tuple(student.shape)}")
        student, teacher = student.float(), teacher.detach().float()
        if attention_mask is None:
            total = total + (student - teacher).square().mean()
            continue
        keep = _token_mask(attention_mask, student.shape[0], student.shape[-1], "attention scores")
        keys = keep[:, None, None, :]
        zero = torch.zeros((), dtype=student.dtype, device=student.device)
        squared = (torch.where(keys, student, zero) - torch.where(keys, teacher, zero)).square()
        if mask_padding:
            pairs = keep[:, None, :, None] & keys
            total = total + squared[pairs.expand_as(squared)].sum() / (pairs.sum() * student.shape[1]).clamp_min(1)
        else:
            total = total + squared.mean()
    return total


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``-(softmax(t / T) * log_softmax(s / T)).sum(-1).mean()`` (teacher detached, no ``T^2`` factor)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits shape {tuple(student_logits.shape)} != teacher logits shape "
                         f"{tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    targets = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(targets * log_probs).sum(-1).mean()


def logits_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    is_regression: bool | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Soft cross-entropy for classification, ``MSE(s, t)`` for regression.

    ``is_regression=None`` decides from the shape: one output per example (``[B]`` or ``[B, 1]``) is regression.
    """
    if is_regression is None:
        is_regression = student_logits.dim() == 1 or student_logits.shape[-1] == 1
    if not is_regression:
        return soft_cross_entropy(student_logits, teacher_logits, temperature)
    if student_logits.numel() != teacher_logits.numel():
        raise ValueError(f"student logits shape {tuple(student_logits.shape)} != teacher logits shape "
                         f"{tuple(teacher_logits.shape)}")
    return F.mse_loss(student_logits.float().reshape(-1), teacher_logits.detach().float().reshape(-1))


def _field(outputs, name: str):
    value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
    if value is None:
        raise ValueError(f"model outputs have no {name!r} (pass output_hidden_states=True for hidden states)")
    return value


def distill_loss(
    student_outputs,
    teacher_outputs,
    student_scores: Sequence[torch.Tensor] | None = None,
    teacher_scores: Sequence[torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    hidden_weight: float = 1.0,
    attention_weight: float = 1.0,
    logits_weight: float = 1.0,
    temperature: float = 1.0,
    is_regression: bool | None = None,
    mask_padding: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted distillation loss ``w_h * hidden + w_a * attention + w_l * logits`` and its detached parts.

    Args:
        student_outputs, teacher_outputs: Hugging Face model outputs (or mappings) with ``hidden_states`` (needed
            when ``hidden_weight != 0``) and ``logits`` (when ``logits_weight != 0``).
        student_scores, teacher_scores: per-layer pre-softmax scores (``capture_attention_scores``), needed when
            ``attention_weight != 0``.
        attention_mask: ``[B, S]`` padding mask (1 = token); masks score keys, and padding with ``mask_padding``.
        hidden_weight, attention_weight, logits_weight: term weights; a term whose weight is 0 is not computed.
        temperature, is_regression: see ``logits_loss``.
        mask_padding: see ``hidden_states_loss`` / ``attention_scores_loss``.

    Returns:
        ``(loss, parts)``: ``parts`` maps ``"hidden"``, ``"attention"``, ``"logits"`` (the computed terms, unweighted)
        to detached scalars.
    """
    parts: dict[str, torch.Tensor] = {}
    total = None
    if hidden_weight:
        term = hidden_states_loss(_field(student_outputs, "hidden_states"), _field(teacher_outputs, "hidden_states"),
                                  attention_mask, mask_padding=mask_padding)
        parts["hidden"], total = term.detach(), hidden_weight * term
    if attention_weight:
        if student_scores is None or teacher_scores is None:
            raise ValueError("attention_weight != 0 needs student_scores and teacher_scores")
        term = attention_scores_loss(student_scores, teacher_scores, attention_mask, mask_padding=mask_padding)
        parts["attention"] = term.detach()
        total = attention_weight * term if total is None else total + attention_weight * term
    if logits_weight:
        term = logits_loss(_field(student_outputs, "logits"), _field(teacher_outputs, "logits"),
                           is_regression=is_regression, temperature=temperature)
        parts["logits"] = term.detach()
        total = logits_weight * term if total is None else total + logits_weight * term
    if total is None:
        raise ValueError("at least one of hidden_weight, attention_weight, logits_weight must be non-zero")
    return total, parts


class DistillationLoss(nn.Module):
    """``distill_loss`` with its options fixed at construction (no parameters).

    Stage 1 of the recipe: ``DistillationLoss(hidden_weight=1, attention_weight=1, logits_weight=0)``;
    stage 2: ``DistillationLoss(hidden_weight=0, attention_weight=0, logits_weight=1)``.
    ``forward(student_outputs, teacher_outputs, student_scores=None, teacher_scores=None, attention_mask=None)``
    returns ``(loss, parts)``.
    """

    def __init__(
        self,
        hidden_weight: float = 1.0,
        attention_weight: float = 1.0,
        logits_weight: float = 1.0,
        *,
        temperature: float = 1.0,
        is_regression: bool | None = None,
        mask_padding: bool = False,
    ):
        super().__init__()
        if not (hidden_weight or attention_weight or logits_weight):
            raise ValueError("at least one of hidden_weight, attention_weight, logits_weight must be non-zero")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.hidden_weight, self.attention_weight, self.logits_weight = hidden_weight, attention_weight, logits_weight
        self.temperature, self.is_regression, self.mask_padding = temperature, is_regression, mask_padding

    @property
    def needs_hidden_states(self) -> bool:
        """Whether forwards must be called with ``output_hidden_states=True``."""
        return bool(self.hidden_weight)

    @property
    def needs_attention_scores(self) -> bool:
        """Whether attention scores must be recorded (``capture_attention_scores``)."""
        return bool(self.attention_weight)

    def forward(self, student_outputs, teacher_outputs, student_scores=None, teacher_scores=None,
                attention_mask=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return distill_loss(
            student_outputs, teacher_outputs, student_scores, teacher_scores, attention_mask,
            hidden_weight=self.hidden_weight, attention_weight=self.attention_weight,
            logits_weight=self.logits_weight, temperature=self.temperature, is_regression=self.is_regression,
            mask_padding=self.mask_padding,
        )

    def extra_repr(self) -> str:
        return (f"hidden_weight={self.hidden_weight}, attention_weight={self.attention_weight}, "
                f"logits_weight={self.logits_weight}, temperature={self.temperature}, "
                f"is_regression={self.is_regression}, mask_padding={self.mask_padding}")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, QuantSelfAttentionMixin)
            or is_bert_self_attention(module)]


def record_attention_scores(model: nn.Module) -> list[nn.Module]:
    """Make every BERT-style self-attention of ``model`` keep its pre-softmax scores, and return them in order.

    After each forward, ``module.scores`` of the returned modules (``[B, heads, S, S]``, masked keys 0, in the
    autograd graph) are the per-layer scores. Full-precision self-attention is swapped in place to the eager class
    of ``triton_bq.attention`` with ``act_bits=None`` (same math, same Parameters). Stays on until
    ``dequantize_attention`` or ``module.record_scores = False``; ``capture_attention_scores`` undoes it by itself.
    """
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"model has no BERT-style self-attention to record ({type(model).__name__})")
    for module in modules:
        if not isinstance(module, QuantSelfAttentionMixin):
            quantize_attention(module, act_bits=None)
        module.record_scores = True
    return modules


class AttentionScoreRecorder:
    """The per-layer pre-softmax scores of a model's latest forward, while recording is on (a sequence).

    ``recorder.scores`` (or iterating / indexing the recorder) gives the list of ``[B, heads, S, S]`` tensors in
    layer order. ``close()`` (or leaving the ``with`` block) restores the model: recording off, attention swapped
    by the recorder back to its original class, stored scores dropped.
    """

    def __init__(self, model: nn.Module):
        self._swapped = [module for module in _attention_modules(model)
                         if not isinstance(module, QuantSelfAttentionMixin)]
        self._previous = {id(module): module.__dict__.get("record_scores") for module in _attention_modules(model)}
        self.modules = record_attention_scores(model)
        self._open = True

    @property
    def scores(self) -> list[torch.Tensor]:
        """Scores of the latest forward, one tensor per layer, in model order."""
        if not self._open:
            raise RuntimeError("the attention score recorder is closed")
        missing = [index for index, module in enumerate(self.modules) if "scores" not in module.__dict__]
        if missing:
            raise RuntimeError(f"no scores recorded yet for attention module(s) {missing}: run a forward first")
        return [module.scores for module in self.modules]

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, index):
        return self.scores[index]

    def __iter__(self):
        return iter(self.scores)

    def close(self) -> None:
        """Turn recording off and restore the attention modules."""
        if not self._open:
            return
        for module in self.modules:
            module.__dict__.pop("scores", None)
            previous = self._previous[id(module)]
            if previous is None:
                module.__dict__.pop("record_scores", None)
            else:
                module.record_scores = previous
        for module in self._swapped:
            dequantize_attention(module)
        self._open = False

    def __enter__(self) -> AttentionScoreRecorder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def capture_attention_scores(model: nn.Module) -> AttentionScoreRecorder:
    """Record ``model``'s pre-softmax attention scores inside a ``with`` block (``AttentionScoreRecorder``).

    ``with capture_attention_scores(model) as recorder: model(**batch); scores = recorder.scores`` gives the
    per-layer scores of the forward, in order; the model is restored when the block ends.
    """
    return AttentionScoreRecorder(model)
