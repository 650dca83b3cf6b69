"""Module swap: ``quantize_(model, config, filter_fn)`` turns a full-precision model into a QAT model in place.

Every function that changes a Hugging Face model's structure (``quantize_``, ``dequantize_``, ternary weight splitting,
width shrinking, packing) refreshes ``model.config.quantization_config`` with ``quantization_record(model)``: the
quantized modules by name and how to rebuild them. ``model.save_pretrained`` writes it into ``config.json``, and
``from_pretrained`` rebuilds the same modules before the weights load (``triton_bq.export.hf``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

from torch import nn
from transformers.pytorch_utils import Conv1D

from triton_bq.arch import (
    BERT_ASYM_ACT_SUFFIXES,
    HEAD_NAMES,
    Family,
    family_of,
    is_asym_site,
    is_causal_lm,
    matches,
)
from triton_bq.nn.activation import default_act_method
from triton_bq.nn.attention import (
    QuantSelfAttentionMixin,
    default_probs_method,
    dequantize_attention,
    dispatches_attention,
    quantize_attention,
)
from triton_bq.nn.embedding import QuantEmbedding, dequantize_embedding, quantize_embedding
from triton_bq.nn.linear import BinaryLinear, QuantConv1D, QuantLinear, TernaryLinear
from triton_bq.nn.packed import PackedEmbedding, PackedLinear, PackedSplitLinear
from triton_bq.nn.split import SplitBinaryEmbedding, SplitBinaryLinear
from triton_bq.options import ACT_GRANULARITIES, GRANULARITIES, STES, WEIGHT_METHODS, check_choice

__all__ = ["QUANT_METHOD", "RECORD_VERSION", "QuantConfig", "default_filter", "dequantize_", "linear_entry",
           "quantization_record", "quantize_", "record_quantization", "attention_entry"]

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
        quantize_attention: quantize Q, K, V and the probabilities inside the attention of the families of
            ``triton_bq.arch.FAMILIES``.
        quantize_pooler: quantize the pooler Linear (the paper does; the classifier head is always kept).
        asym_act_names: ``None`` (default): the asymmetric activation sites of the model's family in
            ``triton_bq.arch.FAMILIES`` (BERT: the FFN-output input, after GELU), or BERT's ``("output.dense",)``
            for a family outside the table. A tuple of Linear names (suffixes; ``attention.*`` excluded) overrides
            them. Those inputs get asymmetric min-max quantization at 8 bits and BinaryBERT's asymmetric LSQ
            (``"asym_lsq"``: learned step, zero point the dynamic min) below 8 bits.
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
    asym_act_names: tuple[str, ...] | None = None
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
        if self.asym_act_names is not None:
            if isinstance(self.asym_act_names, str) or not all(isinstance(n, str) for n in self.asym_act_names):
                raise TypeError(f"asym_act_names must be None or a tuple of names, got {self.asym_act_names!r}")
            self.asym_act_names = tuple(self.asym_act_names)

    @property
    def resolved_embedding_method(self) -> str | None:
        return self.weight_method if self.embedding_method == "same" else self.embedding_method

    def is_asym_site(self, name: str, family: Family | None = None) -> bool:
        """Whether the Linear called ``name`` (in a model of ``family``) gets an asymmetric input quantizer."""
        if self.asym_act_names is None and family is not None:
            return matches(family.asym_sites, name)
        suffixes = BERT_ASYM_ACT_SUFFIXES if self.asym_act_names is None else self.asym_act_names
        return any(is_asym_site(name, suffix) for suffix in suffixes)

    def linear_options(self, name: str, family: Family | None = None) -> dict:
        """Constructor options of the ``QuantLinear`` that replaces the Linear called ``name``."""
        act_method = None
        if self.act_bits is not None and self.is_asym_site(name, family):
            # BinaryBERT's sym_quant_ffn_attn=False: AsymQuantizer at 8 bits, AsymLsqQuantizer with LSQ below.
            act_method = "asym" if self.act_bits == 8 else "asym_lsq"
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

    def tied_head_options(self) -> dict:
        """Options of a Linear tied to a quantized word embedding (``lm_head``): the embedding's row-wise quantizer,
        full-precision input, so that it computes with exactly the embedding's quantized table."""
        return dict(weight_method=self.resolved_embedding_method, granularity="row", ste=self.ste, act_bits=None,
                    backend=self.backend)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def default_filter(module: nn.Module, name: str, config: QuantConfig | None = None) -> bool:
    """Quantize every ``nn.Linear`` / transformers ``Conv1D`` except task heads (classifier, lm_head, ...) and, if
    configured, the pooler. Used for models outside ``triton_bq.arch.FAMILIES``."""
    if not _is_linear(module):
        return False
    parts = name.split(".")
    if any(part in HEAD_NAMES for part in parts):
        return False
    if "pooler" in parts and config is not None and not config.quantize_pooler:
        return False
    return True


def _family_filter(family: Family, config: QuantConfig) -> Callable[[nn.Module, str], bool]:
    def select(module: nn.Module, name: str) -> bool:
        if not matches(family.weights, name):
            return False
        return config.quantize_pooler or not matches(family.pooler, name)

    return select


def _linear_class(weight_method):
    return {"bwn": BinaryLinear, "twn": TernaryLinear, "lat": TernaryLinear}.get(weight_method, QuantLinear)


def _quantized_linear(module: nn.Module, options: dict) -> QuantLinear:
    if isinstance(module, Conv1D):
        return QuantConv1D.from_conv1d(module, **options)
    return _linear_class(options["weight_method"]).from_linear(module, **options)


def _act_signature(quantizer) -> tuple | None:
    return None if quantizer is None else (quantizer.bits, quantizer.method)


def _expected_act(options: dict) -> tuple | None:
    bits = options.get("act_bits")
    if bits is None:
        return None
    return bits, options.get("act_method") or default_act_method(bits)


def _requantize_mismatch(model: nn.Module, config: QuantConfig, family: Family | None) -> str | None:
    """What of ``model`` is already quantized differently from ``config`` (``None`` when nothing is)."""
    embedding_weights = {id(module.weight) for module in model.modules() if isinstance(module, QuantEmbedding)}
    for name, module in model.named_modules():
        if isinstance(module, (SplitBinaryLinear, SplitBinaryEmbedding)):
            return f"{name!r} is a split binary layer (ternary weight splitting): the model is past quantize_"
        if isinstance(module, QuantLinear):
            tied = id(module.weight) in embedding_weights
            options = config.tied_head_options() if tied else config.linear_options(name, family)
            have = dict(weight_method=module.weight_method, granularity=module.granularity, ste=module.ste,
                        backend=module.backend, act=_act_signature(module.act_quantizer))
            want = dict(weight_method=options["weight_method"], granularity=options["granularity"],
                        ste=options["ste"], backend=options["backend"], act=_expected_act(options))
        elif isinstance(module, QuantEmbedding):
            have = dict(weight_method=module.weight_method, ste=module.ste)
            want = dict(weight_method=config.resolved_embedding_method, ste=config.ste)
        elif isinstance(module, QuantSelfAttentionMixin):
            bits = None if module.query_quantizer is None else module.query_quantizer.bits
            wanted = config.act_bits if config.quantize_attention else None
            probs = None if module.probs_quantizer is None else module.probs_quantizer.method
            have = dict(attention_act_bits=bits, probs_method=probs)
            wanted_probs = None if wanted is None else default_probs_method(wanted)
            want = dict(attention_act_bits=wanted, probs_method=wanted_probs)
        else:
            continue
        for key, value in have.items():
            if value != want[key]:
                return f"{name!r} ({type(module).__name__}) has {key}={value!r}, the config asks {want[key]!r}"
    return None


def _replace(model: nn.Module, module: nn.Module, replacement: nn.Module) -> None:
    """Put ``replacement`` at every place ``module`` sits in ``model`` (a module object may be shared)."""
    if replacement is module:
        return
    for name, candidate in list(model.named_modules(remove_duplicate=False)):
        if candidate is module and name:
            model.set_submodule(name, replacement)


def _full_precision_report(model: nn.Module) -> str:
    """Names of the weight-holding layers and attention modules that ``quantize_`` left in full precision."""
    kept = []
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding, SplitBinaryLinear, SplitBinaryEmbedding)):
            continue
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d)):
            kept.append(f"{name} ({type(module).__name__})")
        elif not isinstance(module, QuantSelfAttentionMixin) and (
            dispatches_attention(module) or type(module).__name__.endswith("Attention")
        ):
            kept.append(f"{name} ({type(module).__name__}: Q, K, V and probabilities)")
    return ", ".join(kept) if kept else "nothing"


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

    For a family of the architecture table (``triton_bq.arch.FAMILIES``, found by ``model.config.model_type``):
    the family's weight layers (``nn.Linear`` or transformers ``Conv1D``) become ``BinaryLinear`` /
    ``TernaryLinear`` / ``QuantLinear`` / ``QuantConv1D`` sharing the original Parameters; its word embeddings
    become row-wise ``QuantEmbedding`` when ``config.embedding_method`` is set (``nn.Embedding`` subclasses keep
    their own forward, e.g. BART's scale); its attention modules get Q/K/V/probability quantizers when
    ``config.quantize_attention`` and ``config.act_bits`` are set; its asymmetric activation sites get min-max
    input quantizers at 8 bits, asymmetric LSQ below. Any other model gets every ``nn.Linear`` / ``Conv1D`` but
    task heads (``default_filter``) and its input embedding (``get_input_embeddings()``), and one warning listing
    what stayed in full precision.

    Tied weights are quantized once: every embedding sharing a quantized embedding's weight Parameter (T5's
    ``shared`` / ``encoder.embed_tokens`` / ``decoder.embed_tokens``) is quantized with it, and a Linear sharing it
    (``lm_head`` tied to the word embedding) becomes a ``QuantLinear`` with the embedding's row-wise quantizer and a
    full-precision input, so that it computes with exactly the embedding's quantized table.

    ``filter_fn(module, name)`` replaces the table / ``default_filter`` selection of Linear / ``Conv1D`` layers.

    Raises:
        ValueError: when nothing was quantized (naming what was looked for), or when ``model`` is already quantized
            differently from ``config`` (naming the first such module; ``dequantize_`` it first). Quantizing again
            with the same config quantizes only what is left (and raises when nothing is).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = dataclasses.replace(config, act_granularity=_act_granularity(config, model))
    family = family_of(model)
    mismatch = _requantize_mismatch(model, config, family)
    if mismatch is not None:
        raise ValueError(f"model is already quantized with another config: {mismatch}; call "
                         f"triton_bq.dequantize_(model) before quantizing it again")
    already = sum(isinstance(m, (QuantLinear, QuantEmbedding, QuantSelfAttentionMixin)) for m in model.modules())
    custom_filter = filter_fn is not None
    if filter_fn is None:
        filter_fn = _family_filter(family, config) if family is not None else (
            lambda module, name: default_filter(module, name, config))
    swapped = 0
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and _is_linear(module) and not isinstance(module, QuantLinear) and filter_fn(module, name)
    ]
    for name, module in targets:
        quantized = _quantized_linear(module, config.linear_options(name, family))
        quantized.layer_name = name
        _replace(model, module, quantized)
        swapped += 1
    swapped += _quantize_embeddings(model, config, family)
    if config.quantize_attention and config.act_bits is not None and family is not None:
        for module in model.modules():
            if type(module).__name__ in family.attention and not isinstance(module, QuantSelfAttentionMixin):
                quantize_attention(module, config.act_bits, config.clip_init, config.act_granularity, config.act_sync)
                swapped += 1
    if not swapped:
        looked_for = (f"the {family.name} family's layers of triton_bq.arch" if family is not None and not custom_filter
                      else "nn.Linear / Conv1D layers selected by the filter, the input embedding")
        state = f"; {already} module(s) were already quantized with this config" if already else ""
        raise ValueError(
            f"quantize_ found nothing to quantize in {type(model).__name__} (looked for {looked_for}, word "
            f"embeddings with embedding_method={config.embedding_method!r}, attention with "
            f"quantize_attention={config.quantize_attention}, act_bits={config.act_bits}){state}"
        )
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        warnings.warn(
            f"quantize_: {type(model).__name__} (model_type={model_type!r}) is not a family of "
            f"triton_bq.arch.FAMILIES; quantized its nn.Linear / Conv1D layers (but task heads) and input embedding "
            f"only. Kept in full precision: {_full_precision_report(model)}",
            stacklevel=2,
        )
    record_quantization(model, quant_config=config)
    return model


def _quantize_embeddings(model: nn.Module, config: QuantConfig, family: Family | None) -> int:
    """Quantize the word embeddings, everything tied to them, and Linear layers tied to them; returns how many."""
    method = config.resolved_embedding_method
    if method is None:
        return 0
    modules = list(model.named_modules(remove_duplicate=False))
    if family is not None:
        chosen = [module for name, module in modules if isinstance(module, nn.Embedding)
                  and matches(family.embeddings, name)]
    else:
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embedding = get_embeddings() if callable(get_embeddings) else None
        chosen = [embedding] if isinstance(embedding, nn.Embedding) else []
    weights = {id(module.weight) for module in chosen}
    tied = [(name, module) for name, module in modules if isinstance(module, nn.Embedding)
            and id(module.weight) in weights]
    count, done = 0, {}
    for name, module in tied:
        if isinstance(module, QuantEmbedding) or id(module) in done:
            continue
        quantized = quantize_embedding(module, weight_method=method, ste=config.ste)
        quantized.layer_name = name
        done[id(module)] = quantized
        _replace(model, module, quantized)
        count += 1
    weights |= {id(module.weight) for module in model.modules() if isinstance(module, QuantEmbedding)}
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and id(module.weight) in weights:
            head = _quantized_linear(module, config.tied_head_options())
            head.layer_name = name
            _replace(model, module, head)
            count += 1
    return count


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo ``quantize_`` in place: plain ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` (subclasses get their class
    back) / attention sharing the latent Parameters, so the model computes exactly what it did before."""
    seen = set()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in seen:
            continue
        seen.add(id(module))
        if not name and isinstance(module, (QuantLinear, QuantEmbedding)):
            raise TypeError(f"dequantize_ undoes layers inside a model; got the layer itself ({type(module).__name__})")
        if isinstance(module, QuantConv1D):
            _replace(model, module, module.to_conv1d())
        elif isinstance(module, QuantLinear):
            _replace(model, module, module.to_linear())
        elif isinstance(module, QuantEmbedding):
            _replace(model, module, dequantize_embedding(module))
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
        "act_granularity": "per_tensor" if quantizer is None else quantizer.granularity,
        "act_sync": True if quantizer is None else quantizer.sync,
    }


def attention_entry(module: QuantSelfAttentionMixin) -> dict:
    """How to re-apply ``quantize_attention`` to the attention ``module``: bits, granularity, sync and the
    probabilities' method."""
    quantizer = getattr(module, "query_quantizer", None)
    probs = getattr(module, "probs_quantizer", None)
    return {"type": "QuantSelfAttention", "act_bits": None if quantizer is None else quantizer.bits,
            "act_granularity": "per_tensor" if quantizer is None else quantizer.granularity,
            "act_sync": True if quantizer is None else quantizer.sync,
            "probs_method": None if probs is None else probs.method}


_LINEAR_CLASSES = (QuantLinear, BinaryLinear, TernaryLinear, QuantConv1D)
_PACKED = (PackedLinear, PackedSplitLinear, PackedEmbedding)


def _module_entry(module: nn.Module) -> dict | None:
    if isinstance(module, QuantSelfAttentionMixin):
        return attention_entry(module)
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
