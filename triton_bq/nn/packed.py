"""Inference layers on packed 1-bit / 2-bit weights: ``PackedLinear``, ``PackedSplitLinear``, ``PackedEmbedding``.

Each is built from its training layer (``from_quant_linear``, ``pack_split_linear``, ``from_quant_embedding``) with
the codes and scales the training forward uses, and runs ``triton_bq.ops.packed_linear`` (Triton kernels for CUDA
tensors and under ``TRITON_INTERPRET=1``, a pure-PyTorch reference otherwise). Inference only: no gradients flow
through packed weights. Whole-model export and loading live in ``triton_bq.export``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from triton_bq import reference
from triton_bq.bitpack import PackedWeight, pack_split_binary, pack_weight, unpack_codes, words_per_row
from triton_bq.nn.activation import ActQuantizer, second_moment_of
from triton_bq.nn.embedding import QuantEmbedding, check_plain_lookup
from triton_bq.nn.linear import QuantLinear
from triton_bq.ops import KERNEL_DTYPES, packed_linear

__all__ = [
    "PackedEmbedding",
    "PackedLinear",
    "PackedSplitLinear",
    "act_quantizer_entry",
    "act_quantizer_from_entry",
    "pack_split_linear",
    "same_act_quantizer",
]


def _integer_activations(x, lo, hi, zero, step, qmin, qmax) -> torch.Tensor:
    """The integer codes ``q`` of ``reference.fake_quant_affine`` (same clamp, division and rounding)."""
    xc = torch.minimum(torch.maximum(x.detach().float(), lo), hi)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return torch.clamp(torch.round((xc - zero) / safe), qmin, qmax).to(torch.int8)


def act_quantizer_entry(quantizer) -> dict | None:
    if quantizer is None:
        return None
    return {"bits": quantizer.bits, "method": quantizer.method, "signed": quantizer.signed,
            "granularity": quantizer.granularity}


def act_quantizer_from_entry(entry: dict | None):
    if entry is None:
        return None
    # Manifests written before per-token scales existed have no "granularity": they were per tensor.
    return ActQuantizer(entry["bits"], entry["method"], entry["signed"],
                        granularity=entry.get("granularity", "per_tensor"))


class PackedLinear(nn.Module):
    """Inference ``nn.Linear`` replacement holding a packed binary / ternary weight.

    Buffers: ``packed_weight`` (int32 ``[P, N, ceil(K * bits / 32)]``, see ``triton_bq.bitpack``), ``weight_scale``
    (float32 ``[P, 1]`` or ``[P, N]``) and ``bias`` (``[N]`` or ``None``). An optional ``act_quantizer`` (the
    training layer's ``ActQuantizer``, same state dict keys) quantizes the input as in training: symmetric and
    signed-LSQ inputs that fit in int8 run the integer kernel (``x_scale`` = the quantizer's step: one per token for
    a per-token quantizer, the same codes as training), the others are fake-quantized and run the float kernel.

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
        """Pack a ``triton_bq.QuantLinear`` (``BinaryLinear`` / ``TernaryLinear`` / ``QuantConv1D``, in its
        ``[out_features, in_features]`` layout) with the codes and scale its forward pass uses now (LAT reads the
        attached optimizer's state). The activation quantizer is copied."""
        if not isinstance(module, QuantLinear):
            raise TypeError(f"module must be a triton_bq.QuantLinear, got {type(module).__name__}")
        if module.weight_method is None:
            raise ValueError("module has weight_method=None: a full-precision weight has nothing to pack")
        scale, threshold = module.weight_scale_threshold()
        weight = module.linear_weight().detach().contiguous()
        packed = pack_weight(weight, module.weight_method, module.granularity, scale=scale, threshold=threshold)
        quantizer = copy.deepcopy(module.act_quantizer)
        bias = None if module.bias is None else module.bias.detach().clone()
        return cls.from_packed(packed, bias, quantizer, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, quantizer = self.packed, self.act_quantizer
        if quantizer is None:
            return packed_linear(x, packed, self.bias, backend=self.backend)
        tensors = quantizer.op_tensors(x)
        lo, hi, zero, step, qmin, qmax = reference.act_params(
            x, quantizer.method, quantizer.bits, clip=tensors["act_clip"], step=tensors["act_step"],
            signed=quantizer.signed, granularity=quantizer.granularity,
        )
        # Zero-point methods (asym, asym_lsq) are fake-quantized with the training's zero and step: same codes.
        if quantizer.method not in ("asym", "asym_lsq") and qmin >= -128 and qmax <= 127:
            q = _integer_activations(x, lo, hi, zero, step, qmin, qmax)
            return packed_linear(q, packed, self.bias, x_scale=step, out_dtype=x.dtype, backend=self.backend)
        x_hat = reference.fake_quant_affine(x.detach(), lo, hi, zero, step, qmin, qmax).to(x.dtype)
        return packed_linear(x_hat, packed, self.bias, backend=self.backend)

    def manifest_entry(self) -> dict:
        """How to rebuild this layer (``load_packed``)."""
        return {
            "type": "PackedLinear", "in_features": self.in_features, "out_features": self.out_features,
            "bits": self.bits, "parts": self.parts, "granularity": self.granularity, "bias": self.bias is not None,
            "act": act_quantizer_entry(self.act_quantizer),
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, parts={self.parts}, "
            f"granularity={self.granularity!r}, bias={self.bias is not None}, backend={self.backend!r}"
        )


def same_act_quantizer(first: nn.Module | None, second: nn.Module | None) -> bool:
    """Whether two activation quantizers compute the same thing (same method and equal tensors), or both are None."""
    if first is None or second is None:
        return first is None and second is None
    if act_quantizer_entry(first) != act_quantizer_entry(second):
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
    """Pack a ``triton_bq.SplitBinaryLinear``: a two-part ``PackedLinear`` when both halves quantize
    their input identically (always true right after splitting), else a ``PackedSplitLinear``. The bias is
    ``bias1 + bias2``."""
    half1, half2 = (PackedLinear.from_quant_linear(half, backend=backend) for half in module.halves())
    bias = module.merged_bias()
    if same_act_quantizer(half1.act_quantizer, half2.act_quantizer):
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
        if dtype not in KERNEL_DTYPES:
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
        if not isinstance(module, QuantEmbedding):
            raise TypeError(f"module must be a triton_bq.QuantEmbedding, got {type(module).__name__}")
        if module.weight_method is None:
            raise ValueError("module has weight_method=None: a full-precision table has nothing to pack")
        check_plain_lookup(module, "pack")
        moment = second_moment_of(module) if module.weight_method == "lat" else None
        packed = pack_weight(module.weight, module.weight_method, "row", moment)
        return cls._from_packed(packed, module.padding_idx, module.weight.dtype)

    @classmethod
    def from_split_embedding(cls, module: nn.Module) -> PackedEmbedding:
        """Pack a ``triton_bq.SplitBinaryEmbedding`` as one two-part table."""
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


