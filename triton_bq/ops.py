"""Functional quantized ops: argument checks, then the Triton kernels or the pure-PyTorch reference.

``quant_linear`` and ``quant_embedding`` are the training ops (straight-through gradients); ``packed_linear`` is the
inference op on packed 1-bit / 2-bit weights (``triton_bq.bitpack``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from triton_bq import reference
from triton_bq.bitpack import PackedWeight
from triton_bq.kernels.linear import fused_quant_linear
from triton_bq.kernels.packed_matmul import packed_matmul, quantize_int8
from triton_bq.options import LSQ_METHODS, QuantOptions

__all__ = [
    "ACT_QUANT",
    "BACKENDS",
    "packed_linear",
    "quant_embedding",
    "quant_linear",
    "quantize_int8_reference",
    "resolve_backend",
]

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACT_QUANT = (None, "per_token", "per_tensor")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """``"auto"`` -> ``"triton"`` for fp32/bf16/fp16 CUDA tensors or under ``TRITON_INTERPRET=1``, else
    ``"reference"`` (e.g. float64 inputs, used for gradient checks, always take the reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if tensor.dtype not in KERNEL_DTYPES:
        return "reference"
    if tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


def _check_linear_args(x, weight, bias, options, act_clip, act_step):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if not isinstance(options, QuantOptions):
        raise TypeError(f"options must be a triton_bq.QuantOptions, got {type(options).__name__}")
    for name, tensor in (("x", x), ("weight", weight)):
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dim must equal weight.shape[1]={weight.shape[1]}, got x of shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if options.act_method in LSQ_METHODS:
        if act_step is None or act_step.numel() != 1:
            raise ValueError(f"act_method={options.act_method!r} needs a one-element act_step, got {act_step!r}")
    elif options.act_method is not None and (act_clip is None or act_clip.numel() != 2):
        raise ValueError(
            f"act_method={options.act_method!r} needs act_clip with 2 elements (lo, hi), got {act_clip!r}"
        )


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    options: QuantOptions | None = None,
    *,
    weight_scale: torch.Tensor | None = None,
    weight_threshold: torch.Tensor | None = None,
    act_clip: torch.Tensor | None = None,
    act_step: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = Q_act(x) @ Q_w(weight)^T + bias`` with straight-through gradients.

    Args:
        x: input ``[..., in_features]`` (fp32, bf16 or fp16).
        weight: latent full-precision weight ``[out_features, in_features]``.
        bias: optional ``[out_features]``.
        options: a ``triton_bq.QuantOptions`` (default: binary weights, full-precision input).
        weight_scale, weight_threshold: precomputed ``alpha``/``delta`` overriding the method's own (required for
            ``weight_method="lat"``: ``triton_bq.reference.lat_scale_threshold``).
        act_clip: learnable ``[lo, hi]`` clip for ``act_method`` ``"sym"``/``"asym"`` (PACT gradient).
        act_step: learnable LSQ step for ``act_method`` ``"lsq"`` / ``"asym_lsq"``.
        backend: ``"auto"``, ``"triton"`` (fused kernels) or ``"reference"`` (pure PyTorch).

    The arithmetic of both backends is pinned in ``docs/design.md``.
    """
    options = QuantOptions() if options is None else options
    _check_linear_args(x, weight, bias, options, act_clip, act_step)
    if options.weight_method == "lat" and (weight_scale is None or weight_threshold is None):
        raise ValueError("weight_method='lat' needs weight_scale and weight_threshold (lat_scale_threshold)")
    if options.is_identity:
        return F.linear(x, weight, bias)
    tensors = dict(weight_scale=weight_scale, weight_threshold=weight_threshold, act_clip=act_clip, act_step=act_step)
    if resolve_backend(backend, x) == "triton":
        return fused_quant_linear(x, weight, bias, options, **tensors)
    return reference.quant_linear(x, weight, bias, options, **tensors)


def quant_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    weight_method: str | None = "bwn",
    ste: str = "identity",
    second_moment: torch.Tensor | None = None,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """Row-wise quantized embedding lookup: only the gathered rows are quantized.

    Each row has its own scale (BWN ``mean|w_row|``, TWN/LAT per-row threshold and scale), so quantizing the
    gathered rows equals gathering rows of the fully quantized table, at a fraction of the work.
    ``second_moment`` is the optimizer's ``exp_avg_sq`` of the whole table (LAT only).
    """
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be int32/int64, got dtype {input_ids.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [num_embeddings, dim], got shape {tuple(weight.shape)}")
    rows = F.embedding(input_ids, weight, padding_idx)
    if weight_method is None:
        return rows
    flat = rows.reshape(-1, weight.shape[1])
    if weight_method == "lat":
        moment_rows = None if second_moment is None else second_moment[input_ids.reshape(-1)]
        scale, threshold = reference.lat_scale_threshold(flat, moment_rows, "row")
        quantized = reference.quantize_weight(flat, "lat", "row", ste, scale=scale, threshold=threshold)
    else:
        quantized = reference.quantize_weight(flat, weight_method, "row", ste)
    return quantized.reshape(rows.shape)


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
        packed: a ``triton_bq.bitpack.PackedWeight``.
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
        raise TypeError(f"packed must be a triton_bq.bitpack.PackedWeight, got {type(packed).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in (*KERNEL_DTYPES, torch.int8):
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
            x2, x_scale = quantize_int8(x2, per_token=act_quant == "per_token")
        else:
            x2, x_scale = quantize_int8_reference(x2, per_token=act_quant == "per_token")
        x_scale = x_scale.reshape(-1)
    if use_triton:
        y = packed_matmul(
            x2.detach(), packed.data, packed.scale, None if bias is None else bias.detach(),
            bits=packed.bits, in_features=packed.in_features, x_scale=x_scale, out_dtype=out_dtype,
        )
    else:
        y = _reference_matmul(x2, packed, bias, x_scale, out_dtype)
    return y.reshape(*lead, packed.out_features)
