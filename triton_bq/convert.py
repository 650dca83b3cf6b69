"""Module swap: ``quantize_(model, config, filter_fn)`` turns a full-precision model into a QAT model in place."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

from torch import nn

from triton_bq.arch import BERT_ASYM_ACT_SUFFIXES, HEAD_NAMES, is_asym_site, is_causal_lm
from triton_bq.nn.attention import (
    QuantSelfAttentionMixin,
    dequantize_attention,
    is_bert_self_attention,
    quantize_attention,
)
from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import BinaryLinear, QuantLinear, TernaryLinear
from triton_bq.options import ACT_GRANULARITIES, GRANULARITIES, STES, WEIGHT_METHODS, check_choice

__all__ = ["QuantConfig", "default_filter", "dequantize_", "quantize_"]


@dataclasses.dataclass
class QuantConfig:
    """What ``quantize_`` does. Defaults follow BinaryBERT/TernaryBERT (W-E-A = 1-1-8 for ``"bwn"``).

    Attributes:
        weight_method: ``"bwn"`` (binary), ``"twn"`` (ternary), ``"lat"`` (loss-aware ternary) or ``None``.
        granularity: weight scale per ``"tensor"`` (paper) or per ``"row"`` for Linear layers.
        embedding_method: word-embedding quantizer (row-wise); ``"same"`` follows ``weight_method``; ``None`` keeps it.
        act_bits: activation bits for Linear inputs and attention (8, 4, ..., or ``None`` for weight-only).
        ste: ``"identity"`` or ``"clipped"``.
        quantize_attention: quantize Q, K, V and the probabilities inside BERT-style self-attention.
        quantize_pooler: quantize the pooler Linear (the paper does; the classifier head is always kept).
        asym_act_names: Linear names (suffixes) whose input gets asymmetric min-max 8-bit quantization
            (BERT's FFN-output input, after GELU).
        clip_init: initial activation clip ``+-clip_init``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        act_granularity: measured (sym / asym) activation scales ``"per_tensor"`` or ``"per_token"``; ``None`` (the
            default) picks per the model: ``"per_token"`` for causal LMs (``triton_bq.arch.is_causal_lm``, as BitNet
            and torchao do: a per-tensor scale mixes tokens, so the model is no longer causal), else ``"per_tensor"``
            (the papers'). Asking for ``"per_tensor"`` on a causal LM warns.
        act_sync: synchronize per-tensor scales across data-parallel ranks while training (``ActQuantizer``).
    """

    weight_method: str | None = "bwn"
    granularity: str = "tensor"
    embedding_method: str | None = "same"
    act_bits: int | None = 8
    ste: str = "identity"
    quantize_attention: bool = True
    quantize_pooler: bool = True
    asym_act_names: tuple[str, ...] = BERT_ASYM_ACT_SUFFIXES
    clip_init: float = 2.5
    backend: str = "auto"
    act_granularity: str | None = None
    act_sync: bool = True

    def __post_init__(self):
        check_choice("weight_method", self.weight_method, WEIGHT_METHODS, allow_none=True)
        check_choice("embedding_method", self.embedding_method, ("same", *WEIGHT_METHODS), allow_none=True)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("ste", self.ste, STES)
        check_choice("act_granularity", self.act_granularity, ACT_GRANULARITIES, allow_none=True)
        if self.act_bits is not None and (
            not isinstance(self.act_bits, int) or isinstance(self.act_bits, bool) or not 2 <= self.act_bits <= 8
        ):
            raise ValueError(f"act_bits must be None or an int in 2..8, got {self.act_bits!r}")

    @property
    def resolved_embedding_method(self) -> str | None:
        return self.weight_method if self.embedding_method == "same" else self.embedding_method

    def linear_options(self, name: str) -> dict:
        """Constructor options of the ``QuantLinear`` that replaces the Linear called ``name``."""
        act_method = None
        if self.act_bits == 8 and any(is_asym_site(name, suffix) for suffix in self.asym_act_names):
            act_method = "asym"
        return dict(
            weight_method=self.weight_method,
            granularity=self.granularity,
            ste=self.ste,
            act_bits=self.act_bits,
            act_method=act_method,
            clip_init=self.clip_init,
            act_granularity=self.act_granularity or "per_tensor",
            act_sync=self.act_sync,
            backend=self.backend,
        )


def default_filter(module: nn.Module, name: str, config: QuantConfig | None = None) -> bool:
    """Quantize every ``nn.Linear`` except task heads (classifier, lm_head, ...) and, if configured, the pooler."""
    if not isinstance(module, nn.Linear):
        return False
    parts = name.split(".")
    if any(part in HEAD_NAMES for part in parts):
        return False
    if "pooler" in parts and config is not None and not config.quantize_pooler:
        return False
    return True


def _linear_class(weight_method):
    return {"bwn": BinaryLinear, "twn": TernaryLinear, "lat": TernaryLinear}.get(weight_method, QuantLinear)


def _act_granularity(config: QuantConfig, model: nn.Module) -> str:
    causal = is_causal_lm(model)
    if config.act_granularity is None:
        return "per_token" if causal else "per_tensor"
    if causal and config.act_granularity == "per_tensor" and config.act_bits is not None:
        warnings.warn(
            "act_granularity='per_tensor' on a causal LM: one scale over all tokens makes each token's output depend "
            "on later tokens and on the other samples (and generate() differ with and without the KV cache); "
            "act_granularity='per_token' keeps the model causal",
            stacklevel=3,
        )
    return config.act_granularity


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Swap ``model``'s layers for quantized ones in place and return ``model``.

    Linear layers selected by ``filter_fn(module, name)`` (default: ``default_filter``, every Linear but task
    heads) become ``BinaryLinear``/``TernaryLinear``/``QuantLinear`` sharing the original Parameters; the
    input word embedding (``model.get_input_embeddings()``) becomes a row-wise ``QuantEmbedding`` when
    ``config.embedding_method`` is set; BERT-style self-attention gets Q/K/V/probability quantizers when
    ``config.quantize_attention`` and ``config.act_bits`` are set. Works on any ``nn.Module`` (only the
    embedding and attention steps are specific to Hugging Face models and are skipped where absent).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = dataclasses.replace(config, act_granularity=_act_granularity(config, model))
    if filter_fn is None:
        filter_fn = lambda module, name: default_filter(module, name, config)  # noqa: E731
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and not isinstance(module, QuantLinear) and filter_fn(module, name)
    ]
    for name, module in targets:
        quantized = _linear_class(config.weight_method).from_linear(module, **config.linear_options(name))
        model.set_submodule(name, quantized)
    embedding_method = config.resolved_embedding_method
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if embedding_method is not None and callable(get_embeddings):
        embedding = get_embeddings()
        if type(embedding) is nn.Embedding:
            quantized = QuantEmbedding.from_embedding(embedding, weight_method=embedding_method, ste=config.ste)
            name = next(name for name, module in model.named_modules() if module is embedding)
            model.set_submodule(name, quantized)
    if config.quantize_attention and config.act_bits is not None:
        for module in model.modules():
            if is_bert_self_attention(module) and not isinstance(module, QuantSelfAttentionMixin):
                quantize_attention(module, config.act_bits, config.clip_init)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo ``quantize_`` in place: plain ``nn.Linear``/``nn.Embedding``/attention sharing the latent Parameters."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            model.set_submodule(name, module.to_linear())
        elif isinstance(module, QuantEmbedding):
            model.set_submodule(name, module.to_embedding())
        elif isinstance(module, QuantSelfAttentionMixin):
            dequantize_attention(module)
    return model
