"""Quantized self-attention for BERT-family models (Hugging Face ``*SelfAttention`` with query/key/value).

The paper quantizes Q and K before ``Q K^T``, V before ``P V`` and the attention probabilities ``P``; the
pre-softmax scores stay in full precision. ``quantize_attention`` swaps the class of an existing attention
module in place (its Linear children and their Parameters are untouched) and adds the four quantizers;
``dequantize_attention`` undoes it. The swapped module can also keep its pre-softmax scores for attention
distillation (``record_scores = True``; masked positions are zero in ``scores``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from triton_bq.nn.activation import ActQuantizer

__all__ = ["QuantSelfAttentionMixin", "is_bert_self_attention", "quantize_attention", "dequantize_attention"]

_QUANT_CLASSES: dict[type, type] = {}
_MASKED_BELOW = -1.0e2


def is_bert_self_attention(module: nn.Module) -> bool:
    """A BERT-style self-attention: query/key/value Linears and head bookkeeping, no cross-attention."""
    return (
        type(module).__name__.endswith("SelfAttention")
        and all(isinstance(getattr(module, name, None), nn.Linear) for name in ("query", "key", "value"))
        and hasattr(module, "attention_head_size")
        and hasattr(module, "num_attention_heads")
    )


class QuantSelfAttentionMixin:
    """Eager attention with fake-quantized Q, K, V and probabilities; mixed in front of the original class."""

    record_scores: bool = False

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            cache = getattr(past_key_values, "self_attention_cache", past_key_values)
            key, value = cache.update(key, value, self.layer_idx)
        if self.query_quantizer is not None:
            query, key, value = self.query_quantizer(query), self.key_quantizer(key), self.value_quantizer(value)
        scaling = getattr(self, "scaling", self.attention_head_size**-0.5)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        keep = None
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                keep = attention_mask
                masked = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            else:
                keep = attention_mask > _MASKED_BELOW
                masked = scores + attention_mask
        else:
            masked = scores
        if self.record_scores:
            self.scores = scores if keep is None else torch.where(keep, scores, torch.zeros_like(scores))
        probs = F.softmax(masked, dim=-1, dtype=torch.float32).to(query.dtype)
        if self.probs_quantizer is not None:
            probs = self.probs_quantizer(probs)
        probs = self.dropout(probs)
        output = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return output.reshape(*hidden_states.shape[:-1], -1), probs


def _quant_class(cls: type) -> type:
    if cls not in _QUANT_CLASSES:
        _QUANT_CLASSES[cls] = type(f"Quant{cls.__name__}", (QuantSelfAttentionMixin, cls), {})
    return _QUANT_CLASSES[cls]


def quantize_attention(module: nn.Module, act_bits: int | None = 8, clip_init: float = 2.5) -> nn.Module:
    """Swap a BERT-style self-attention to its quantized class in place and return it.

    ``act_bits=8``: Q, K, V symmetric uniform with learnable clips, probabilities asymmetric min-max.
    ``act_bits<8``: LSQ, unsigned for the probabilities. ``act_bits=None``: full precision (eager attention
    that can record scores, used for teachers in distillation).
    """
    if not is_bert_self_attention(module):
        raise TypeError(f"module must be a BERT-style self-attention, got {type(module).__name__}")
    base = type(module).__mro__[2] if isinstance(module, QuantSelfAttentionMixin) else type(module)
    device = module.query.weight.device
    module.__class__ = _quant_class(base)
    if act_bits is None:
        quantizers = dict(query_quantizer=None, key_quantizer=None, value_quantizer=None, probs_quantizer=None)
    else:
        probs_method = "asym" if act_bits == 8 else "lsq"
        quantizers = dict(
            query_quantizer=ActQuantizer(act_bits, clip_init=clip_init),
            key_quantizer=ActQuantizer(act_bits, clip_init=clip_init),
            value_quantizer=ActQuantizer(act_bits, clip_init=clip_init),
            probs_quantizer=ActQuantizer(act_bits, probs_method, signed=False, clip_init=clip_init),
        )
    for name, quantizer in quantizers.items():
        setattr(module, name, None if quantizer is None else quantizer.to(device))
    return module


def dequantize_attention(module: nn.Module) -> nn.Module:
    """Undo ``quantize_attention``: restore the original class and drop the quantizers."""
    if not isinstance(module, QuantSelfAttentionMixin):
        raise TypeError(f"module is not a quantized attention, got {type(module).__name__}")
    for name in ("query_quantizer", "key_quantizer", "value_quantizer", "probs_quantizer"):
        delattr(module, name)
    module.__dict__.pop("scores", None)
    module.__dict__.pop("record_scores", None)
    module.__class__ = type(module).__mro__[2]
    return module
