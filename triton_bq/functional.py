"""Functional quantized ops: argument checks, then the Triton kernels or the pure-PyTorch reference."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from triton_bq import reference

__all__ = ["BACKENDS", "resolve_backend", "quant_linear", "quant_embedding"]

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def _check_linear_args(x, weight, bias, weight_method, granularity, ste, act_method, act_bits, act_clip, act_step):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
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
    if weight_method is not None and weight_method not in reference.WEIGHT_METHODS:
        raise ValueError(f"weight_method must be one of {reference.WEIGHT_METHODS} or None, got {weight_method!r}")
    if granularity not in reference.GRANULARITIES:
        raise ValueError(f"granularity must be one of {reference.GRANULARITIES}, got {granularity!r}")
    if ste not in reference.STES:
        raise ValueError(f"ste must be one of {reference.STES}, got {ste!r}")
    if act_method is None:
        return
    if act_method not in reference.ACT_METHODS:
        raise ValueError(f"act_method must be one of {reference.ACT_METHODS} or None, got {act_method!r}")
    if not isinstance(act_bits, int) or isinstance(act_bits, bool) or not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be an int in 2..8, got {act_bits!r}")
    if act_method == "lsq":
        if act_step is None or act_step.numel() != 1:
            raise ValueError(f"act_method='lsq' needs a one-element act_step, got {act_step!r}")
    elif act_clip is None or act_clip.numel() != 2:
        raise ValueError(f"act_method={act_method!r} needs act_clip with 2 elements (lo, hi), got {act_clip!r}")


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_method: str | None = "bwn",
    granularity: str = "tensor",
    ste: str = "identity",
    weight_scale: torch.Tensor | None = None,
    weight_threshold: torch.Tensor | None = None,
    act_method: str | None = None,
    act_bits: int = 8,
    act_clip: torch.Tensor | None = None,
    act_step: torch.Tensor | None = None,
    act_signed: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = Q_act(x) @ Q_w(weight)^T + bias`` with straight-through gradients.

    Args:
        x: input ``[..., in_features]`` (fp32, bf16 or fp16).
        weight: latent full-precision weight ``[out_features, in_features]``.
        bias: optional ``[out_features]``.
        weight_method: ``"bwn"`` (binary), ``"twn"`` (ternary), ``"lat"`` (loss-aware ternary; needs
            ``weight_scale``/``weight_threshold`` from ``triton_bq.quantizers.lat_scale_threshold``) or
            ``None`` (weight kept in full precision).
        granularity: ``"tensor"`` (one scale per matrix) or ``"row"`` (one per output feature).
        ste: ``"identity"`` (default) or ``"clipped"`` (gradient only where ``|w| <= 1``).
        weight_scale, weight_threshold: precomputed ``alpha``/``delta`` overriding the method's own.
        act_method: ``None``, ``"sym"``, ``"asym"`` or ``"lsq"`` (per-tensor activation fake-quant).
        act_bits: activation bits (2..8).
        act_clip: learnable ``[lo, hi]`` clip for ``sym``/``asym`` (PACT gradient).
        act_step: learnable LSQ step for ``lsq``; ``act_signed=False`` for non-negative inputs.
        backend: ``"auto"``, ``"triton"`` (fused kernels) or ``"reference"`` (pure PyTorch).

    The arithmetic of both backends is pinned in ``docs/design.md``.
    """
    _check_linear_args(x, weight, bias, weight_method, granularity, ste, act_method, act_bits, act_clip, act_step)
    if weight_method == "lat" and (weight_scale is None or weight_threshold is None):
        raise ValueError("weight_method='lat' needs weight_scale and weight_threshold (lat_scale_threshold)")
    options = dict(
        weight_method=weight_method,
        granularity=granularity,
        ste=ste,
        weight_scale=weight_scale,
        weight_threshold=weight_threshold,
        act_method=act_method,
        act_bits=act_bits,
        act_clip=act_clip,
        act_step=act_step,
        act_signed=act_signed,
    )
    if weight_method is None and act_method is None:
        return F.linear(x, weight, bias)
    if resolve_backend(backend, x) == "triton":
        from triton_bq.kernels.linear import fused_quant_linear

        return fused_quant_linear(x, weight, bias, **options)
    return reference.quant_linear(x, weight, bias, **options)


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
