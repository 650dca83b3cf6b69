"""Quantized attention for Hugging Face models: Q, K, V and the attention probabilities fake-quantized.

The paper quantizes Q and K before ``Q K^T``, V before ``P V`` and the attention probabilities ``P``; the
pre-softmax scores stay in full precision. Every family of ``triton_bq.arch`` computes its attention through
transformers' attention interface (``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)``)
after its own projections, rotary embeddings, cache update and head bookkeeping. ``quantize_attention`` therefore
keeps the module's own ``forward`` and swaps its class in place (``triton_bq.nn.swap``: picklable) to one whose
``config`` reads as the model's config except for ``_attn_implementation``, which selects
``quantized_attention_forward``: eager attention with the module's four quantizers (grouped K/V heads, T5's position
bias, boolean / additive / implicit causal masks). Its Linear children and their Parameters are untouched;
``dequantize_attention`` undoes it. The swapped module can also keep its pre-softmax scores for attention
distillation (``record_scores = True``; masked positions are zero in ``scores``).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from triton_bq.nn.activation import ActQuantizer
from triton_bq.nn.swap import original_class, swap_class, unswap_class
from triton_bq.options import check_choice

__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "PROBS_METHODS",
    "QuantSelfAttentionMixin",
    "dequantize_attention",
    "dispatches_attention",
    "is_bert_self_attention",
    "quantize_attention",
    "quantized_attention_forward",
]

# The name under which ``quantized_attention_forward`` is registered in transformers' AttentionInterface.
ATTENTION_IMPLEMENTATION = "triton_bq_quantized"
QUANTIZER_NAMES = ("query_quantizer", "key_quantizer", "value_quantizer", "probs_quantizer")
# Quantizers of the (non-negative) attention probabilities; "lsq" is unsigned LSQ.
PROBS_METHODS = ("asym", "lsq", "asym_lsq")


def default_probs_method(act_bits: int) -> str:
    """BinaryBERT's probability quantizer (``sym_quant_ffn_attn=False``): ``AsymQuantizer`` (min-max) at 8 bits,
    ``AsymLsqQuantizer`` (``"asym_lsq"``) below."""
    return "asym" if act_bits == 8 else "asym_lsq"
_MASKED_BELOW = -1.0e2


def is_bert_self_attention(module: nn.Module) -> bool:
    """A BERT-style self-attention: query/key/value Linears and head bookkeeping, no cross-attention."""
    return (
        type(module).__name__.endswith("SelfAttention")
        and all(isinstance(getattr(module, name, None), nn.Linear) for name in ("query", "key", "value"))
        and hasattr(module, "attention_head_size")
        and hasattr(module, "num_attention_heads")
    )


def dispatches_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face attention that computes through the attention interface (its config has
    ``_attn_implementation`` and its modeling file uses ``ALL_ATTENTION_FUNCTIONS``), i.e. can be quantized here."""
    cls = original_class(module) or type(module)
    modeling = sys.modules.get(cls.__module__)
    config = module.__dict__.get("config")
    return (
        hasattr(config, "_attn_implementation")
        and getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None) is not None
    )


class _QuantizedAttentionConfig:
    """A quantized attention module's view of its model config: every attribute is the config's (reads and writes),
    except ``_attn_implementation``, which names ``quantized_attention_forward``."""

    __slots__ = ("_config",)

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    @property
    def _attn_implementation(self) -> str:
        return ATTENTION_IMPLEMENTATION

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_config"), name, value)


class QuantSelfAttentionMixin:
    """Mixed in front of a Hugging Face attention class by ``quantize_attention``: the module's ``config`` selects
    ``quantized_attention_forward``; ``query_quantizer`` ... ``probs_quantizer`` are its ``ActQuantizer`` (or
    ``None``); ``record_scores = True`` keeps the pre-softmax scores of the latest forward in ``scores``."""

    record_scores: bool = False

    @property
    def config(self):
        return _QuantizedAttentionConfig(self.__dict__["config"])

    @config.setter
    def config(self, value):
        self.__dict__["config"] = value


def _repeat_heads(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H, S, D] -> [B, H * groups, S, D]``, each head repeated ``groups`` times (grouped-query attention)."""
    if groups == 1:
        return tensor
    batch, heads, length, dim = tensor.shape
    return tensor[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def quantized_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with fake-quantized Q, K, V (before the inner products) and probabilities (before ``P V``).

    ``query`` ``[B, H, L, D]``, ``key``/``value`` ``[B, H_kv, S, D]`` (after rotary embeddings and the cache update,
    repeated to ``H`` heads after quantization), ``attention_mask`` additive float, boolean (True keeps) or ``None``
    (then causal when ``module.is_causal``, as transformers' SDPA path). ``position_bias`` is T5's. Returns
    ``(output [B, L, H, D], probabilities)`` like transformers' eager functions, with the same arithmetic order.
    """
    quantizers = [getattr(module, name, None) for name in QUANTIZER_NAMES]
    if quantizers[0] is not None:
        query, key, value = quantizers[0](query), quantizers[1](key), quantizers[2](value)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    keep = None
    masked = scores
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            keep = mask
            masked = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        else:
            keep = mask > _MASKED_BELOW
            masked = scores + mask
    elif getattr(module, "is_causal", True) and query.shape[2] > 1:
        # transformers' SDPA masks are None where SDPA applies its own causal mask: apply it here.
        length, keys = query.shape[2], key.shape[2]
        keep = torch.ones(length, keys, dtype=torch.bool, device=scores.device).tril(keys - length)
        masked = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    if getattr(module, "record_scores", False):
        module.scores = scores if keep is None else torch.where(keep, scores, torch.zeros_like(scores))
    probs = F.softmax(masked, dim=-1, dtype=torch.float32).to(query.dtype)
    if quantizers[3] is not None:
        probs = quantizers[3](probs)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


transformers.AttentionInterface.register(ATTENTION_IMPLEMENTATION, quantized_attention_forward)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def quantize_attention(
    module: nn.Module, act_bits: int | None = 8, clip_init: float = 2.5, granularity: str = "per_tensor",
    sync: bool = True, probs_method: str | None = None,
) -> nn.Module:
    """Swap a Hugging Face attention module to its quantized class in place and return it.

    ``act_bits=8``: Q, K, V symmetric uniform with learnable clips, probabilities asymmetric min-max.
    ``act_bits<8``: Q, K, V signed LSQ, probabilities BinaryBERT's asymmetric LSQ (``"asym_lsq"``: zero point the
    dynamic min, step initialised to ``4 * mean|p| / sqrt(2^bits - 1)``). ``probs_method`` (one of
    ``PROBS_METHODS``; ``"lsq"`` is unsigned LSQ) overrides the probabilities' quantizer (``None``: the default
    above). ``act_bits=None``: full precision (eager attention
    that can record scores, used for teachers in distillation). ``granularity`` and ``sync`` are those of
    ``ActQuantizer`` (``"per_token"``: one scale per row of Q, K, V and of the probabilities, which keeps a causal
    model causal). Quantizing an already quantized module replaces
    its quantizers. Raises TypeError for a module that does not compute through transformers' attention interface
    (``dispatches_attention``).
    """
    if not dispatches_attention(module):
        raise TypeError(
            f"module must be a Hugging Face attention computing through transformers' attention interface, got "
            f"{type(module).__name__}"
        )
    check_choice("probs_method", probs_method, PROBS_METHODS, allow_none=True)
    device = _device_of(module)
    if not isinstance(module, QuantSelfAttentionMixin):
        swap_class(module, (QuantSelfAttentionMixin, type(module)))
    if act_bits is None:
        quantizers = dict.fromkeys(QUANTIZER_NAMES)
    else:
        probs_method = default_probs_method(act_bits) if probs_method is None else probs_method
        common = dict(clip_init=clip_init, granularity=granularity, sync=sync)
        quantizers = dict(
            query_quantizer=ActQuantizer(act_bits, **common),
            key_quantizer=ActQuantizer(act_bits, **common),
            value_quantizer=ActQuantizer(act_bits, **common),
            probs_quantizer=ActQuantizer(act_bits, probs_method, signed=False, **common),
        )
    for name, quantizer in quantizers.items():
        setattr(module, name, None if quantizer is None else quantizer.to(device))
    return module


def dequantize_attention(module: nn.Module) -> nn.Module:
    """Undo ``quantize_attention``: restore the original class and drop the quantizers."""
    if not isinstance(module, QuantSelfAttentionMixin):
        raise TypeError(f"module is not a quantized attention, got {type(module).__name__}")
    for name in QUANTIZER_NAMES:
        delattr(module, name)
    module.__dict__.pop("scores", None)
    module.__dict__.pop("record_scores", None)
    return unswap_class(module)
