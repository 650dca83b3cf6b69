"""Inference on packed 1-bit / 2-bit weights: the ``packed_linear`` op, ``PackedLinear`` / ``PackedEmbedding``, and
export / load of whole models (``save_packed`` / ``load_packed``).

``packed_linear`` runs the Triton kernels of ``triton_bq.kernels.packed_matmul`` for CUDA tensors and under
``TRITON_INTERPRET=1``, and a pure-PyTorch dequantize-then-matmul reference otherwise (``backend=`` overrides).
Everything here is inference only: no gradients flow through packed weights.

On disk, ``save_packed(model, directory)`` writes ``model.safetensors`` (packed codes, float32 scales and every other
tensor of the state dict at its own dtype; the latent full-precision weights of quantized layers are dropped) and
``packed.json`` (which modules are packed and how, the Hugging Face config and architecture when there is one, and
the true sizes). ``load_packed(directory, model_or_config)`` rebuilds the inference model.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from triton_bq import reference
from triton_bq.functional import resolve_backend
from triton_bq.packing import PackedWeight, unpack_codes, words_per_row

__all__ = [
    "ACT_QUANT",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "PackedEmbedding",
    "PackedLinear",
    "PackedSplitLinear",
    "load_packed",
    "model_sizes",
    "pack_model",
    "pack_split_linear",
    "packed_linear",
    "packed_state_dict",
    "quantize_int8_reference",
    "save_packed",
]

ACT_QUANT = (None, "per_token", "per_tensor")
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "packed.json"
FORMAT = "triton_bq.packed"
FORMAT_VERSION = 1
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_int8_reference(x: torch.Tensor, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 activations: ``scale = max|x| / 127`` per row of ``[M, K]`` (or per tensor), ``q =
    clamp(round_half_even(x / scale), -127, 127)`` (a zero scale divides by 1). Returns ``(q int8, scale float32)``
    with ``scale`` of shape ``[M]`` or ``[]``. The Triton kernel ``quantize_int8`` computes the same bits.
    """
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1) if per_token else xf.abs().amax()
    scale = amax / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    divisor = safe.unsqueeze(-1) if per_token else safe
    q = torch.clamp(torch.round(xf / divisor), -127, 127).to(torch.int8)
    return q, scale


def _reference_matmul(x, packed: PackedWeight, bias, x_scale, out_dtype):
    """Dequantize-then-matmul for float x; exact integer products (float64) for int8 x, epilogue as the kernels."""
    x = x.detach()
    bias_ = None if bias is None else bias.detach()
    if x.dtype != torch.int8 and x_scale is None:
        weight = packed.dequantize(x.dtype)
        return F.linear(x, weight, None if bias_ is None else bias_.to(x.dtype)).to(out_dtype)
    if x.dtype == torch.int8:
        codes = packed.codes(torch.float64)
        scale = packed.scale.detach().float()
        y = None
        for part in range(packed.parts):
            term = (x.double() @ codes[part].T).float() * scale[part]
            y = term if y is None else y + term
    else:
        y = F.linear(x, packed.dequantize(x.dtype), None).float()
    y = y * x_scale.detach().float().reshape(-1, 1)
    if bias_ is not None:
        y = y + bias_.float()
    return y.to(out_dtype)


def packed_linear(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    x_scale: torch.Tensor | None = None,
    act_quant: str | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x_scale * (x @ W^T) + bias`` with a packed binary / ternary weight ``W = sum_p scale[p] * codes[p]``.

    Args:
        x: ``[..., in_features]``: float32 / bfloat16 / float16, or int8 activations (then ``x_scale`` is required).
        packed: a ``triton_bq.packing.PackedWeight``.
        bias: optional ``[out_features]``.
        x_scale: per-tensor (one element) or per-row (``x.shape[:-1]`` elements) scale of ``x``.
        act_quant: ``None``, ``"per_token"`` or ``"per_tensor"``: quantize float ``x`` to int8 with an absmax scale
            first (``quantize_int8_reference``) and multiply int8 activations by +-1/0 codes in integers.
        out_dtype: default ``x.dtype`` for float ``x``, float32 for int8 ``x``.
        backend: ``"auto"`` (Triton for CUDA tensors and under ``TRITON_INTERPRET=1``, PyTorch otherwise),
            ``"triton"`` or ``"reference"`` (dequantize-then-matmul).

    Returns ``[..., out_features]``. Inference only: no gradients.
    """
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a triton_bq.packing.PackedWeight, got {type(packed).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in (*_FLOAT_DTYPES, torch.int8):
        raise TypeError(f"x must be float32, bfloat16, float16 or int8, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != packed.in_features:
        raise ValueError(f"x's last dim must be in_features={packed.in_features}, got shape {tuple(x.shape)}")
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    if act_quant is not None and (x.dtype == torch.int8 or x_scale is not None):
        raise ValueError("act_quant quantizes float x itself: pass neither int8 x nor x_scale with it")
    if x.dtype == torch.int8 and x_scale is None:
        raise ValueError("int8 x needs x_scale (the activation scale: one value, or one per row)")
    if out_dtype is None:
        out_dtype = torch.float32 if x.dtype == torch.int8 else x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features)
    if x_scale is not None:
        if not isinstance(x_scale, torch.Tensor):
            raise TypeError(f"x_scale must be a tensor, got {type(x_scale).__name__}")
        if x_scale.numel() not in (1, x2.shape[0]):
            raise ValueError(
                f"x_scale must have 1 or {x2.shape[0]} elements (x.shape[:-1]), got shape {tuple(x_scale.shape)}"
            )
        x_scale = x_scale.reshape(-1)
    use_triton = resolve_backend(backend, x) == "triton"
    if act_quant is not None:
        if use_triton:
            from triton_bq.kernels.packed_matmul import quantize_int8

            x2, x_scale = quantize_int8(x2, per_token=act_quant == "per_token")
        else:
            x2, x_scale = quantize_int8_reference(x2, per_token=act_quant == "per_token")
        x_scale = x_scale.reshape(-1)
    if use_triton:
        from triton_bq.kernels.packed_matmul import packed_matmul

        y = packed_matmul(
            x2.detach(), packed.data, packed.scale, None if bias is None else bias.detach(),
            bits=packed.bits, in_features=packed.in_features, x_scale=x_scale, out_dtype=out_dtype,
        )
    else:
        y = _reference_matmul(x2, packed, bias, x_scale, out_dtype)
    return y.reshape(*lead, packed.out_features)


def _integer_activations(x, lo, hi, zero, step, qmin, qmax) -> torch.Tensor:
    """The integer codes ``q`` of ``reference.fake_quant_affine`` (same clamp, division and rounding)."""
    xc = torch.minimum(torch.maximum(x.detach().float(), lo), hi)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return torch.clamp(torch.round((xc - zero) / safe), qmin, qmax).to(torch.int8)


def _act_entry(quantizer) -> dict | None:
    if quantizer is None:
        return None
    return {"bits": quantizer.bits, "method": quantizer.method, "signed": quantizer.signed}


def _make_act_quantizer(entry: dict | None):
    if entry is None:
        return None
    from triton_bq.quantizers import ActQuantizer

    return ActQuantizer(entry["bits"], entry["method"], entry["signed"])


class PackedLinear(nn.Module):
    """Inference ``nn.Linear`` replacement holding a packed binary / ternary weight.

    Buffers: ``packed_weight`` (int32 ``[P, N, ceil(K * bits / 32)]``, see ``triton_bq.packing``), ``weight_scale``
    (float32 ``[P, 1]`` or ``[P, N]``) and ``bias`` (``[N]`` or ``None``). An optional ``act_quantizer`` (the
    training layer's ``ActQuantizer``, same state dict keys) quantizes the input as in training: symmetric and
    signed-LSQ inputs that fit in int8 run the integer kernel (``x_scale`` = the quantizer's step), the others are
    fake-quantized and run the float kernel.

    Args:
        in_features, out_features: K and N.
        bits: 1 (binary) or 2 (ternary).
        parts: 1, or 2 for a split-binary layer (two binary matrices whose outputs add up).
        granularity: ``"tensor"`` (one scale per matrix) or ``"row"`` (one per output row).
        bias: whether the layer has a bias.
        act_quantizer: optional ``triton_bq.ActQuantizer``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``packed_linear``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 1,
        parts: int = 1,
        granularity: str = "tensor",
        bias: bool = True,
        act_quantizer: nn.Module | None = None,
        device=None,
        backend: str = "auto",
    ):
        super().__init__()
        if parts not in (1, 2):
            raise ValueError(f"parts must be 1 or 2, got {parts!r}")
        if granularity not in reference.GRANULARITIES:
            raise ValueError(f"granularity must be one of {reference.GRANULARITIES}, got {granularity!r}")
        words = words_per_row(in_features, bits)
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"out_features must be a positive int, got {out_features!r}")
        self.in_features, self.out_features, self.bits, self.backend = in_features, out_features, bits, backend
        scales = 1 if granularity == "tensor" else out_features
        self.register_buffer("packed_weight", torch.zeros(parts, out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.zeros(parts, scales, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.act_quantizer = act_quantizer

    @property
    def parts(self) -> int:
        return self.packed_weight.shape[0]

    @property
    def granularity(self) -> str:
        return "tensor" if self.weight_scale.shape[1] == 1 else "row"

    @property
    def packed(self) -> PackedWeight:
        """The ``PackedWeight`` view of the buffers (no copy)."""
        return PackedWeight(self.packed_weight, self.weight_scale, self.bits, self.in_features)

    @classmethod
    def from_packed(
        cls, packed: PackedWeight, bias: torch.Tensor | None = None, act_quantizer: nn.Module | None = None,
        backend: str = "auto",
    ) -> PackedLinear:
        """A layer holding ``packed`` (buffers share its tensors), ``bias`` and ``act_quantizer``."""
        if not isinstance(packed, PackedWeight):
            raise TypeError(f"packed must be a PackedWeight, got {type(packed).__name__}")
        module = cls(packed.in_features, packed.out_features, packed.bits, packed.parts, packed.granularity,
                     bias is not None, act_quantizer, device="meta", backend=backend)
        module.packed_weight = packed.data
        module.weight_scale = packed.scale.float()
        module.bias = None if bias is None else bias.detach()
        return module

    @classmethod
    def from_quant_linear(cls, module: nn.Module, backend: str = "auto") -> PackedLinear:
        """Pack a ``triton_bq.QuantLinear`` (``BinaryLinear`` / ``TernaryLinear``) with the codes and scale its forward
        pass uses now (LAT reads the attached optimizer's state). The activation quantizer is copied."""
        from triton_bq.modules import QuantLinear
        from triton_bq.packing import pack_weight

        if not isinstance(module, QuantLinear):
            raise TypeError(f"module must be a triton_bq.QuantLinear, got {type(module).__name__}")
        if module.weight_method is None:
            raise ValueError("module has weight_method=None: a full-precision weight has nothing to pack")
        scale, threshold = module.weight_scale_threshold()
        packed = pack_weight(module.weight, module.weight_method, module.granularity, scale=scale, threshold=threshold)
        quantizer = copy.deepcopy(module.act_quantizer)
        bias = None if module.bias is None else module.bias.detach().clone()
        return cls.from_packed(packed, bias, quantizer, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, quantizer = self.packed, self.act_quantizer
        if quantizer is None:
            return packed_linear(x, packed, self.bias, backend=self.backend)
        options = quantizer.linear_kwargs(x)
        lo, hi, zero, step, qmin, qmax = reference.act_params(
            x, options["act_method"], options["act_bits"], clip=options["act_clip"], step=options["act_step"],
            signed=options["act_signed"],
        )
        if options["act_method"] != "asym" and qmin >= -128 and qmax <= 127:
            q = _integer_activations(x, lo, hi, zero, step, qmin, qmax)
            return packed_linear(q, packed, self.bias, x_scale=step, out_dtype=x.dtype, backend=self.backend)
        x_hat = reference.fake_quant_affine(x.detach(), lo, hi, zero, step, qmin, qmax).to(x.dtype)
        return packed_linear(x_hat, packed, self.bias, backend=self.backend)

    def manifest_entry(self) -> dict:
        """How to rebuild this layer (``load_packed``)."""
        return {
            "type": "PackedLinear", "in_features": self.in_features, "out_features": self.out_features,
            "bits": self.bits, "parts": self.parts, "granularity": self.granularity, "bias": self.bias is not None,
            "act": _act_entry(self.act_quantizer),
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, parts={self.parts}, "
            f"granularity={self.granularity!r}, bias={self.bias is not None}, backend={self.backend!r}"
        )


def _same_quantizer(first: nn.Module | None, second: nn.Module | None) -> bool:
    """Whether two activation quantizers compute the same thing (same method and equal tensors), or both are None."""
    if first is None or second is None:
        return first is None and second is None
    if _act_entry(first) != _act_entry(second):
        return False
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        torch.equal(first_state[key], second_state[key]) for key in first_state
    )


class PackedSplitLinear(nn.Module):
    """Inference form of a split-binary layer whose two halves quantize their input differently.

    ``y = half1(x) + half2(x)`` with two binary ``PackedLinear`` halves, each with its own activation quantizer; the
    bias (``bias1 + bias2``) lives in ``half1``. When both halves quantize the input identically, ``pack_model``
    uses a single two-part ``PackedLinear`` instead (one kernel launch).
    """

    def __init__(self, half1: PackedLinear, half2: PackedLinear):
        super().__init__()
        for name, half in (("half1", half1), ("half2", half2)):
            if not isinstance(half, PackedLinear):
                raise TypeError(f"{name} must be a PackedLinear, got {type(half).__name__}")
        if (half1.in_features, half1.out_features) != (half2.in_features, half2.out_features):
            raise ValueError(f"half1 and half2 must have the same shape, got {half1.extra_repr()} and "
                             f"{half2.extra_repr()}")
        self.half1, self.half2 = half1, half2
        self.in_features, self.out_features = half1.in_features, half1.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.half1(x) + self.half2(x)

    def manifest_entry(self) -> dict:
        """How to rebuild this layer (``load_packed``)."""
        return {"type": "PackedSplitLinear", "half1": self.half1.manifest_entry(), "half2": self.half2.manifest_entry()}


def pack_split_linear(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Pack a ``triton_bq.modules_split.SplitBinaryLinear``: a two-part ``PackedLinear`` when both halves quantize
    their input identically (always true right after splitting), else a ``PackedSplitLinear``. The bias is
    ``bias1 + bias2``."""
    half1, half2 = (PackedLinear.from_quant_linear(half, backend=backend) for half in module.halves())
    bias = module.merged_bias()
    if _same_quantizer(half1.act_quantizer, half2.act_quantizer):
        both = PackedWeight(
            torch.cat([half1.packed_weight, half2.packed_weight]), torch.cat([half1.weight_scale, half2.weight_scale]),
            1, module.in_features,
        )
        return PackedLinear.from_packed(both, bias, half1.act_quantizer, backend)
    half1.bias, half2.bias = bias, None
    return PackedSplitLinear(half1, half2)


class PackedEmbedding(nn.Module):
    """Inference replacement of the row-wise quantized ``triton_bq.QuantEmbedding``: gather packed rows, unpack, scale.

    Buffers: ``packed_weight`` (int32 ``[P, num_embeddings, ceil(dim * bits / 32)]``) and ``weight_scale`` (float32
    ``[P, num_embeddings]``), ``P = 2`` for a split-binary table (the two halves add up). Outputs
    ``sum_p scale * codes`` computed in float32 and cast to ``dtype`` (the training table's dtype): for one part
    exactly the values ``QuantEmbedding`` produces.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int = 1,
        padding_idx: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        parts: int = 1,
    ):
        super().__init__()
        words = words_per_row(embedding_dim, bits)
        if not isinstance(num_embeddings, int) or num_embeddings < 1:
            raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
        if parts not in (1, 2):
            raise ValueError(f"parts must be 1 or 2, got {parts!r}")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.padding_idx, self.dtype = padding_idx, dtype
        codes = torch.zeros(parts, num_embeddings, words, dtype=torch.int32, device=device)
        self.register_buffer("packed_weight", codes)
        self.register_buffer("weight_scale", torch.zeros(parts, num_embeddings, dtype=torch.float32, device=device))

    @property
    def parts(self) -> int:
        return self.packed_weight.shape[0]

    @property
    def packed(self) -> PackedWeight:
        """The table as a ``PackedWeight`` (row granularity)."""
        return PackedWeight(self.packed_weight, self.weight_scale, self.bits, self.embedding_dim)

    @classmethod
    def _from_packed(cls, packed: PackedWeight, padding_idx, dtype) -> PackedEmbedding:
        embedding = cls(packed.out_features, packed.in_features, packed.bits, padding_idx, device="meta", dtype=dtype,
                        parts=packed.parts)
        embedding.packed_weight = packed.data
        embedding.weight_scale = packed.scale
        return embedding

    @classmethod
    def from_quant_embedding(cls, module: nn.Module) -> PackedEmbedding:
        """Pack a ``triton_bq.QuantEmbedding`` with its row-wise codes and scales (LAT reads the optimizer state)."""
        from triton_bq.modules import QuantEmbedding
        from triton_bq.packing import pack_weight
        from triton_bq.quantizers import second_moment_of

        if not isinstance(module, QuantEmbedding):
            raise TypeError(f"module must be a triton_bq.QuantEmbedding, got {type(module).__name__}")
        if module.weight_method is None:
            raise ValueError("module has weight_method=None: a full-precision table has nothing to pack")
        moment = second_moment_of(module) if module.weight_method == "lat" else None
        packed = pack_weight(module.weight, module.weight_method, "row", moment)
        return cls._from_packed(packed, module.padding_idx, module.weight.dtype)

    @classmethod
    def from_split_embedding(cls, module: nn.Module) -> PackedEmbedding:
        """Pack a ``triton_bq.modules_split.SplitBinaryEmbedding`` as one two-part table."""
        from triton_bq.packing import pack_split_binary

        packed = pack_split_binary(module.weight1, module.weight2, "row")
        return cls._from_packed(packed, module.padding_idx, module.weight1.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be int32/int64, got dtype {input_ids.dtype}")
        out = None
        for part in range(self.parts):
            codes = unpack_codes(self.packed_weight[part][input_ids], self.bits, self.embedding_dim, torch.float32)
            rows = self.weight_scale[part].float()[input_ids].unsqueeze(-1) * codes
            out = rows if out is None else out + rows
        return out.to(self.dtype)

    def manifest_entry(self) -> dict:
        """How to rebuild this table (``load_packed``)."""
        return {
            "type": "PackedEmbedding", "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
            "bits": self.bits, "parts": self.parts, "padding_idx": self.padding_idx,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, parts={self.parts}, "
                f"padding_idx={self.padding_idx}")


_PACKED_TYPES = (PackedLinear, PackedSplitLinear, PackedEmbedding)


def _is_packable(module: nn.Module) -> bool:
    from triton_bq.modules import QuantEmbedding, QuantLinear
    from triton_bq.modules_split import SplitBinaryEmbedding, SplitBinaryLinear

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
    from triton_bq.modules import QuantEmbedding
    from triton_bq.modules_split import SplitBinaryEmbedding, SplitBinaryLinear

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


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


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
        _set_child(target, name, _to_packed(module))
    return target


def _assemble(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
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
    return _assemble(model)[0]


def _sizes(state: dict[str, torch.Tensor], packed: dict[str, nn.Module]) -> dict:
    layers = {
        f"{name}.{inner}" if name and inner else name or inner: layer
        for name, module in packed.items()
        for inner, layer in module.named_modules()
        if isinstance(layer, (PackedLinear, PackedEmbedding))
    }
    packed_bytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    fp32_bytes = 0
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf == "packed_weight":
            fp32_bytes += tensor.shape[0] * tensor.shape[1] * layer.packed.in_features * 4
        elif layer is None or leaf != "weight_scale":
            fp32_bytes += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
    return {"packed_bytes": packed_bytes, "fp32_bytes": fp32_bytes}


def model_sizes(model: nn.Module) -> dict:
    """``{"packed_bytes", "fp32_bytes"}``: the tensor payload ``save_packed`` writes, and the latent model in float32
    (each packed ``[N, K]`` matrix at 4 bytes per weight, both halves of a split layer, no scales; every other floating
    tensor at 4 bytes per element, other tensors at their own size)."""
    return _sizes(*_assemble(model))


def _manifest_modules(model: nn.Module, packed: dict[str, nn.Module]) -> dict:
    from triton_bq.attention import QuantSelfAttentionMixin
    from triton_bq.modules import QuantLinear

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


def save_packed(model: nn.Module, path: str | os.PathLike) -> dict:
    """Export a quantized (or already packed) model to the directory ``path``: ``model.safetensors`` + ``packed.json``.

    Returns the sizes written to the manifest: ``packed_bytes`` (tensor payload of the file: 1 bit per binary
    weight, 2 bits per ternary weight padded to whole int32 words along K, float32 scales, every other tensor at its
    dtype) and ``fp32_bytes`` (see ``model_sizes``).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state, packed = _assemble(model)
    config = getattr(model, "config", None)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "config": config.to_dict() if callable(getattr(config, "to_dict", None)) else None,
        "modules": _manifest_modules(model, packed),
        "sizes": _sizes(state, packed),
    }
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage: write independent contiguous CPU copies.
    save_file({key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in state.items()},
              str(directory / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dict(manifest["sizes"])


def _packed_linear_from_entry(entry: dict, device, backend: str) -> PackedLinear:
    return PackedLinear(
        entry["in_features"], entry["out_features"], entry["bits"], entry["parts"], entry["granularity"],
        entry["bias"], _make_act_quantizer(entry["act"]), device=device, backend=backend,
    )


def _build_model(manifest: dict, model_or_config) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    import transformers

    architecture = getattr(transformers, manifest.get("architecture") or "", None)
    if architecture is None:
        raise ValueError(
            f"cannot build architecture {manifest.get('architecture')!r} from transformers: pass the full-precision "
            "model (an nn.Module of the same structure) as model_or_config"
        )
    config = model_or_config
    if config is None:
        if manifest.get("config") is None:
            raise ValueError("the manifest has no config: pass model_or_config")
        options = dict(manifest["config"])
        config = transformers.AutoConfig.for_model(options.pop("model_type"), **options)
    elif not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(
            f"model_or_config must be an nn.Module, a PretrainedConfig or None, got {type(config).__name__}"
        )
    return architecture(config)


def load_packed(
    path: str | os.PathLike, model_or_config=None, *, device=None, backend: str = "auto"
) -> nn.Module:
    """Rebuild the inference model saved by ``save_packed``.

    ``model_or_config``: the full-precision model (any ``nn.Module`` with the original, unquantized structure, whose
    weights are then overwritten), a Hugging Face ``PretrainedConfig`` (the saved architecture is built from it) or
    ``None`` (the saved config). Quantized attention is re-applied, packed layers become ``PackedLinear`` /
    ``PackedEmbedding`` (with ``backend``), and the state dict is loaded strictly. Returns the model in eval mode.
    """
    from safetensors.torch import load_file

    from triton_bq.attention import quantize_attention
    from triton_bq.modules import QuantLinear

    directory = Path(path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{directory / MANIFEST_NAME} is not a {FORMAT} v{FORMAT_VERSION} manifest: "
                         f"format={manifest.get('format')!r}, version={manifest.get('version')!r}")
    model = _build_model(manifest, model_or_config)
    if device is not None:
        model.to(device)
    reference_tensor = next(iter(model.state_dict().values()), None)
    target_device = reference_tensor.device if reference_tensor is not None else torch.device("cpu")
    entries = manifest["modules"]
    # Attention first: its quantizers are added while query/key/value are still nn.Linear.
    for name, entry in entries.items():
        if entry["type"] == "QuantSelfAttention":
            quantize_attention(model.get_submodule(name), entry["act_bits"])
    for name, entry in entries.items():
        kind = entry["type"]
        if kind == "PackedLinear":
            module = _packed_linear_from_entry(entry, target_device, backend)
        elif kind == "PackedSplitLinear":
            module = PackedSplitLinear(*(_packed_linear_from_entry(entry[half], target_device, backend)
                                         for half in ("half1", "half2")))
        elif kind == "PackedEmbedding":
            module = PackedEmbedding(
                entry["num_embeddings"], entry["embedding_dim"], entry["bits"], entry["padding_idx"],
                device=target_device, dtype=getattr(torch, entry["dtype"]), parts=entry["parts"],
            )
        elif kind == "QuantLinear":
            options = {key: entry[key] for key in ("weight_method", "granularity", "ste", "act_bits", "act_method",
                                                   "act_signed")}
            module = QuantLinear.from_linear(model.get_submodule(name), **options)
        elif kind == "QuantSelfAttention":
            continue
        else:
            raise ValueError(f"unknown module type {kind!r} for {name!r} in {directory / MANIFEST_NAME}")
        _set_child(model, name, module.to(target_device))
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(target_device)), strict=True)
    return model.eval()
