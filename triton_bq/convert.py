"""Module swap: ``quantize_(model, config, filter_fn)`` turns a full-precision model into a QAT model in place.

Every function that changes a Hugging Face model's structure (``quantize_``, ``dequantize_``, ternary weight splitting,
width shrinking, packing) refreshes ``model.config.quantization_config`` with ``quantization_record(model)``: the
quantized modules by name and how to rebuild them. ``model.save_pretrained`` writes it into ``config.json``, and
``from_pretrained`` rebuilds the same modules before the weights load (``triton_bq.export.hf``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from triton_bq.arch import BERT_ASYM_ACT_SUFFIXES, HEAD_NAMES, is_asym_site
from triton_bq.nn.attention import (
    QuantSelfAttentionMixin,
    dequantize_attention,
    is_bert_self_attention,
    quantize_attention,
)
from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import BinaryLinear, QuantLinear, TernaryLinear
from triton_bq.nn.packed import PackedEmbedding, PackedLinear, PackedSplitLinear
from triton_bq.nn.split import SplitBinaryEmbedding, SplitBinaryLinear
from triton_bq.options import GRANULARITIES, STES, WEIGHT_METHODS, check_choice

__all__ = ["QUANT_METHOD", "RECORD_VERSION", "QuantConfig", "default_filter", "dequantize_", "linear_entry",
           "quantization_record", "quantize_", "record_quantization"]

# ``quant_method`` of triton_bq's Hugging Face quantization config, and the version of the record's layout.
QUANT_METHOD = "triton_bq"
RECORD_VERSION = 1


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

    def __post_init__(self):
        check_choice("weight_method", self.weight_method, WEIGHT_METHODS, allow_none=True)
        check_choice("embedding_method", self.embedding_method, ("same", *WEIGHT_METHODS), allow_none=True)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("ste", self.ste, STES)
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
    record_quantization(model, quant_config=config)
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
    record_quantization(model)
    return model


def linear_entry(module: QuantLinear) -> dict:
    """How to rebuild the ``QuantLinear`` ``module``: its class and options (not its initial clip: that is a
    Parameter, loaded with the weights)."""
    quantizer = module.act_quantizer
    return {
        "type": "QuantLinear", "class": type(module).__name__ if type(module) in _LINEAR_CLASSES else "QuantLinear",
        "weight_method": module.weight_method, "granularity": module.granularity, "ste": module.ste,
        "act_bits": None if quantizer is None else quantizer.bits,
        "act_method": None if quantizer is None else quantizer.method,
        "act_signed": True if quantizer is None else quantizer.signed, "backend": module.backend,
    }


_LINEAR_CLASSES = (QuantLinear, BinaryLinear, TernaryLinear)
_PACKED = (PackedLinear, PackedSplitLinear, PackedEmbedding)


def _module_entry(module: nn.Module) -> dict | None:
    if isinstance(module, QuantSelfAttentionMixin):
        quantizer = getattr(module, "query_quantizer", None)
        return {"type": "QuantSelfAttention", "act_bits": None if quantizer is None else quantizer.bits}
    if isinstance(module, _PACKED):
        return module.manifest_entry()
    if isinstance(module, (SplitBinaryLinear, SplitBinaryEmbedding)) and not all(
        isinstance(half, (QuantLinear, QuantEmbedding)) for half in module.halves()
    ):
        # Halves made full precision by dequantize_: no loader rebuilds this, so loading it fails by name.
        return {"type": f"dequantized {type(module).__name__}"}
    if isinstance(module, SplitBinaryLinear):
        return {"type": "SplitBinaryLinear", "bias": module.half1.bias is not None,
                "half1": linear_entry(module.half1), "half2": linear_entry(module.half2)}
    if isinstance(module, SplitBinaryEmbedding):
        return {"type": "SplitBinaryEmbedding", "ste": module.half1.ste}
    if isinstance(module, QuantLinear):
        return linear_entry(module)
    if isinstance(module, QuantEmbedding):
        return {"type": "QuantEmbedding", "weight_method": module.weight_method, "ste": module.ste}
    return None


def quantization_record(model: nn.Module, width_plan: dict | None = None, quant_config: QuantConfig | None = None
                        ) -> dict:
    """The JSON-serializable description of ``model``'s quantized structure: ``modules`` (every quantized, split
    or packed module and quantized attention by name, outermost only, with what rebuilds it), ``width_plan`` (the
    heads and FFN neurons a narrowed model kept, ``triton_bq.recipe.width``) and ``quant_config`` (the options of the
    last ``quantize_``, for reference). Empty ``modules`` and no plan: a plain model."""
    modules: dict[str, dict] = {}
    outer: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in outer):
            continue
        entry = _module_entry(module)
        if entry is not None:
            modules[name] = entry
            if not isinstance(module, QuantSelfAttentionMixin):
                outer.append(name)
    return {
        "quant_method": QUANT_METHOD, "version": RECORD_VERSION,
        "format": "packed" if any(isinstance(module, _PACKED) for module in model.modules()) else "latent",
        "modules": modules, "width_plan": width_plan,
        "quant_config": None if quant_config is None else dataclasses.asdict(quant_config),
    }


def _existing_record(config) -> dict | None:
    existing = getattr(config, "quantization_config", None)
    if existing is None:
        return None
    existing = existing if isinstance(existing, dict) else existing.to_dict()
    return existing if existing.get("quant_method") == QUANT_METHOD else None


def _compose_plans(first: dict | None, second: dict | None, counts_before: dict | None = None) -> dict | None:
    """The plan of shrinking by ``first`` then by ``second`` (whose indices count the heads/neurons ``first`` kept).

    ``counts_before``: ``{layer: (heads, neurons)}`` of the model ``second`` was applied to; when ``first`` did not
    leave those counts, ``first`` is a stale record (a config read from disk onto a full-width model) and
    ``second`` alone describes the model."""
    if first is None or second is None:
        return second or first
    if counts_before is not None and any(
        layer not in first or (len(first[layer]["heads"]), len(first[layer]["neurons"])) != counts_before[layer]
        for layer in second
    ):
        return second
    return {layer: {key: [first[layer][key][index] for index in kept[key]] for key in ("heads", "neurons")}
            for layer, kept in second.items()}


def record_quantization(model: nn.Module, *, width_plan: dict | None = None, width_counts: dict | None = None,
                        quant_config: QuantConfig | None = None) -> None:
    """Refresh ``model.config.quantization_config`` (Hugging Face models only: those with a ``config`` that has
    ``to_dict``) with ``quantization_record(model)``, keeping the width plan and options recorded earlier
    (``width_plan``: the plan just applied to a model with ``width_counts`` ``{layer: (heads, neurons)}``, composed
    with an earlier one). Removes it when nothing is left."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_dict", None)):
        return
    existing = _existing_record(config) or {}
    plan = _compose_plans(existing.get("width_plan"), width_plan, width_counts)
    record = quantization_record(model, plan, None)
    record["quant_config"] = dataclasses.asdict(quant_config) if quant_config else existing.get("quant_config")
    if record["modules"] or record["width_plan"]:
        config.quantization_config = record
    elif hasattr(config, "quantization_config"):
        del config.quantization_config
