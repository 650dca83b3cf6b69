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

from triton_bq.nn.attention import QuantSelfAttentionMixin
from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import QuantLinear
from triton_bq.nn.packed import PackedEmbedding, PackedLinear, PackedSplitLinear, pack_split_linear
from triton_bq.nn.split import SplitBinaryEmbedding, SplitBinaryLinear

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "WEIGHTS_NAME", "pack_model", "manifest_modules",
           "packed_parts", "packed_state_dict"]


WEIGHTS_NAME = "model.safetensors"


MANIFEST_NAME = "packed.json"


FORMAT = "triton_bq.packed"


FORMAT_VERSION = 1


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
    return target


def packed_parts(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The packed state dict of ``model`` and its packed modules by name, without copying the whole model."""
    packed = {name: _to_packed(module) for name, module in _packable_modules(model)}
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
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantSelfAttentionMixin):
            quantizer = getattr(module, "query_quantizer", None)
            modules[name] = {"type": "QuantSelfAttention", "act_bits": None if quantizer is None else quantizer.bits}
    for name, module in packed.items():
        modules[name] = module.manifest_entry()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and not any(_is_under(name, outer) for outer in packed):
            quantizer = module.act_quantizer
            modules[name] = {
                "type": "QuantLinear", "weight_method": module.weight_method, "granularity": module.granularity,
                "ste": module.ste, "act_bits": None if quantizer is None else quantizer.bits,
                "act_method": None if quantizer is None else quantizer.method,
                "act_signed": True if quantizer is None else quantizer.signed,
            }
    return modules
