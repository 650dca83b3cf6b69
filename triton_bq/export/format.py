"""The packed model format: which modules pack, how a training model becomes its inference model, and the
packed state dict that ``save_packed`` writes.

On disk a packed model is ``model.safetensors`` (packed codes, float32 scales and every other tensor of the state dict
at its own dtype; the latent full-precision weights of quantized layers are dropped) and ``packed.json`` (which
modules are packed and how, the Hugging Face config and architecture when there is one, and the true sizes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from triton_bq.convert import attention_entry, linear_entry, record_quantization
from triton_bq.nn.attention import QuantSelfAttentionMixin, quantize_attention
from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import BinaryLinear, QuantConv1D, QuantLinear, TernaryLinear
from triton_bq.nn.packed import (
    PackedEmbedding,
    PackedLinear,
    PackedSplitLinear,
    act_quantizer_from_entry,
    pack_split_linear,
)
from triton_bq.nn.split import SplitBinaryEmbedding, SplitBinaryLinear

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "WEIGHTS_NAME", "build_modules", "pack_model",
           "manifest_modules", "packed_parts", "packed_state_dict", "tied_keys"]


WEIGHTS_NAME = "model.safetensors"


MANIFEST_NAME = "packed.json"


FORMAT = "triton_bq.packed"


# 2: the manifest records each file's size and sha256, and the state-dict keys written once for tied tensors.
FORMAT_VERSION = 2


_PACKED_TYPES = (PackedLinear, PackedSplitLinear, PackedEmbedding)


def _is_packable(module: nn.Module) -> bool:
    if isinstance(module, (*_PACKED_TYPES, SplitBinaryLinear, SplitBinaryEmbedding)):
        return True
    if callable(getattr(module, "to_packed", None)):
        return True
    return isinstance(module, (QuantLinear, QuantEmbedding)) and module.weight_method is not None


def _is_under(key: str, name: str) -> bool:
    """Whether the state-dict key or module name ``key`` is (in) the module called ``name`` ("" is the root)."""
    return name == "" or key == name or key.startswith(name + ".")


def _packable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost packable modules: quantized Linear / Embedding layers, packed ones, and any with ``to_packed()``."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(_is_under(name, outer) for outer, _ in found):
            continue
        if _is_packable(module):
            found.append((name, module))
    return found


def _to_packed(module: nn.Module) -> nn.Module:
    """The inference module of a packable one (itself when already packed)."""
    if isinstance(module, _PACKED_TYPES):
        return module
    if callable(getattr(module, "to_packed", None)):
        packed = module.to_packed()
        if not isinstance(packed, _PACKED_TYPES):
            raise TypeError(f"{type(module).__name__}.to_packed() must return a PackedLinear, PackedSplitLinear or "
                            f"PackedEmbedding, got {type(packed).__name__}")
        return packed
    if isinstance(module, SplitBinaryLinear):
        return pack_split_linear(module)
    if isinstance(module, SplitBinaryEmbedding):
        return PackedEmbedding.from_split_embedding(module)
    if isinstance(module, QuantEmbedding):
        return PackedEmbedding.from_quant_embedding(module)
    return PackedLinear.from_quant_linear(module)


def pack_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Inference model of a quantized training model: every quantized Linear becomes a ``PackedLinear`` and the
    quantized embedding a ``PackedEmbedding`` (modules with a ``to_packed()`` method, e.g. split-binary layers, are
    replaced by what it returns). Other modules (attention quantizers, LayerNorm, heads) are kept.
    ``inplace=False`` packs a deep copy and leaves ``model`` untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    for name, module in _packable_modules(target):
        if not name:
            return _to_packed(target)
        target.set_submodule(name, _to_packed(module))
    record_quantization(target)
    return target


def _share_tied_codes(module: nn.Module, packed: nn.Module, codes_of: dict[int, nn.Module]) -> None:
    """Layers quantized on one latent weight (a word embedding and the lm_head tied to it, both row-wise) pack to the
    same codes and scales: the later one takes the first one's tensors, so the file holds them once (``tied_keys``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(packed, (PackedLinear, PackedEmbedding)):
        return
    first = codes_of.setdefault(id(weight), packed)
    if first is packed:
        return
    same = all(getattr(first, name).shape == getattr(packed, name).shape
               and torch.equal(getattr(first, name), getattr(packed, name))
               for name in ("packed_weight", "weight_scale"))
    if same:
        packed.packed_weight, packed.weight_scale = first.packed_weight, first.weight_scale


def packed_parts(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The packed state dict of ``model`` and its packed modules by name, without copying the whole model."""
    packed = {}
    codes_of: dict[int, nn.Module] = {}
    for name, module in _packable_modules(model):
        packed[name] = _to_packed(module)
        _share_tied_codes(module, packed[name], codes_of)
    state: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, tensor in model.state_dict().items():
        owner = next((name for name in packed if _is_under(key, name)), None)
        if owner is None:
            state[key] = tensor
        elif owner not in done:
            done.add(owner)
            state.update(packed[owner].state_dict(prefix=owner + "." if owner else ""))
    return state, packed


def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``save_packed`` writes: packed layers' buffers instead of their latent weights, the rest as is."""
    return packed_parts(model)[0]


def manifest_modules(model: nn.Module, packed: dict[str, nn.Module]) -> dict:
    """The ``modules`` of a packed manifest: quantized attention, the packed modules and the quantized Linear layers
    left unpacked (``weight_method=None`` with an input quantizer)."""
    modules = {name: attention_entry(module) for name, module in model.named_modules()
               if isinstance(module, QuantSelfAttentionMixin)}
    for name, module in packed.items():
        modules[name] = module.manifest_entry()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and not any(_is_under(name, outer) for outer in packed):
            modules[name] = linear_entry(module)
    return modules


def tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: first key}`` for every state-dict entry that is the same tensor (same storage, offset, shape and
    strides) as an earlier entry: a tied weight, written once under its first key."""
    first: dict[tuple, str] = {}
    tied = {}
    for key, tensor in state.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if identity in first:
            tied[key] = first[identity]
        else:
            first[identity] = key
    return tied


_LINEAR_CLASSES = {"QuantLinear": QuantLinear, "BinaryLinear": BinaryLinear, "TernaryLinear": TernaryLinear,
                   "QuantConv1D": QuantConv1D}
_LINEAR_OPTIONS = ("weight_method", "granularity", "ste", "act_bits", "act_method", "act_signed")


def _linear_options(entry: dict, backend: str | None) -> dict:
    options = {key: entry[key] for key in _LINEAR_OPTIONS}
    options["backend"] = backend or entry.get("backend", "auto")
    # Records written before activation granularity existed are per-tensor and synchronized.
    options["act_granularity"] = entry.get("act_granularity", "per_tensor")
    options["act_sync"] = entry.get("act_sync", True)
    return options


def _packed_linear_from_entry(entry: dict, device, backend: str) -> PackedLinear:
    return PackedLinear(
        entry["in_features"], entry["out_features"], entry["bits"], entry["parts"], entry["granularity"],
        entry["bias"], act_quantizer_from_entry(entry["act"]), device=device, backend=backend,
    )


def _split_linear_from_entry(original: nn.Module, entry: dict, device, backend: str | None) -> SplitBinaryLinear:
    halves = []
    for half in ("half1", "half2"):
        options = _linear_options(entry[half], backend)
        options.pop("weight_method")
        halves.append(BinaryLinear(original.in_features, original.out_features, entry["bias"], device=device,
                                   **options))
    return SplitBinaryLinear.from_halves(*halves)


def _legacy_probs_method(act_bits) -> str | None:
    """The probabilities' method of a record written before ``probs_method`` was recorded: unsigned LSQ below 8
    bits (asymmetric LSQ became the default later), the default (min-max) otherwise."""
    return "lsq" if isinstance(act_bits, int) and act_bits < 8 else None


def _rebuilt(name: str, original: nn.Module, entry: dict, device, backend: str | None, source: str) -> nn.Module:
    kind = entry.get("type")
    if kind == "PackedLinear":
        return _packed_linear_from_entry(entry, device, backend or "auto")
    if kind == "PackedSplitLinear":
        return PackedSplitLinear(*(_packed_linear_from_entry(entry[half], device, backend or "auto")
                                   for half in ("half1", "half2")))
    if kind == "PackedEmbedding":
        return PackedEmbedding(entry["num_embeddings"], entry["embedding_dim"], entry["bits"], entry["padding_idx"],
                               device=device, dtype=getattr(torch, entry["dtype"]), parts=entry["parts"])
    if kind == "QuantLinear":
        linear_class = _LINEAR_CLASSES.get(entry.get("class", "QuantLinear"))
        if linear_class is None:
            raise ValueError(f"module {name!r}: unknown layer class {entry.get('class')!r} in the record")
        if linear_class is QuantConv1D:
            if not isinstance(original, Conv1D):
                raise ValueError(f"module {name!r} is a {type(original).__name__}, the record makes a QuantConv1D "
                                 "of a transformers Conv1D")
            return QuantConv1D.from_conv1d(original, **_linear_options(entry, backend))
        if not isinstance(original, nn.Linear):
            raise ValueError(f"module {name!r} is a {type(original).__name__}, the record makes a QuantLinear of an "
                             "nn.Linear")
        return linear_class.from_linear(original, **_linear_options(entry, backend))
    if kind == "QuantEmbedding":
        if not isinstance(original, nn.Embedding):
            raise ValueError(f"module {name!r} is a {type(original).__name__}, the record makes a QuantEmbedding of "
                             "an nn.Embedding")
        return QuantEmbedding.from_embedding(original, weight_method=entry["weight_method"], ste=entry["ste"])
    if kind == "SplitBinaryLinear":
        return _split_linear_from_entry(original, entry, device, backend)
    if kind == "SplitBinaryEmbedding":
        return SplitBinaryEmbedding(original.num_embeddings, original.embedding_dim, original.padding_idx,
                                    device=device, dtype=original.weight.dtype, ste=entry["ste"])
    raise ValueError(f"unknown module type {kind!r} for {name!r} in {source}")


def build_modules(model: nn.Module, modules: dict[str, dict], *, device=None, backend: str | None = None,
                  source: str = "the record") -> nn.Module:
    """Rebuild, in place, the quantized / split / packed modules and quantized attention that ``modules`` describes
    (the ``modules`` of a packed manifest or of ``triton_bq.convert.quantization_record``) on ``model``, a model of
    the original full-precision structure (already narrowed if it was). New tensors are created on ``device``
    (default: that of the module replaced; e.g. ``meta`` before a Hugging Face load) and are to be overwritten by a
    state dict. ``backend`` overrides the recorded one. ``source`` names the description in errors."""
    if not isinstance(modules, dict):
        raise ValueError(f"{source}: modules must be a dict of module name -> entry, got {type(modules).__name__}")
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(name for name in modules if name not in names)
    if unknown:
        raise ValueError(f"{source} names modules that {type(model).__name__} does not have: {unknown[:5]} (a "
                         f"record of another architecture, or of a model with another head)")
    # Attention first: its quantizers are added while query/key/value are still nn.Linear.
    for name, entry in modules.items():
        if entry.get("type") == "QuantSelfAttention":
            quantize_attention(model.get_submodule(name), entry["act_bits"],
                               granularity=entry.get("act_granularity", "per_tensor"), sync=entry.get("act_sync", True),
                               probs_method=entry.get("probs_method", _legacy_probs_method(entry["act_bits"])))
    for name, entry in modules.items():
        if entry.get("type") == "QuantSelfAttention":
            continue
        original = model.get_submodule(name)
        tensor = next(iter(original.parameters()), None)
        target = device if device is not None else (tensor.device if tensor is not None else torch.device("cpu"))
        module = _rebuilt(name, original, entry, target, backend, source)
        module.to(target)
        if name:
            model.set_submodule(name, module)
        else:
            return module
    return model
