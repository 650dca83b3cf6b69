"""Scale reductions of the fused quantized linear: weight ``alpha``/``delta`` and the activation fake-quant scalars.

Everything stays on the device (no ``.item()``): the GEMM kernels read these float32 tensors through pointers.
The arithmetic is ``docs/design.md``'s; only the summation order differs from the reference (rtol 1e-6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_bq import reference
from triton_bq.options import ACT_GRANULARITIES, check_choice

from . import configs
from ._common import check_kernel_tensor, launch, new_output

__all__ = ["ACT_CODES", "ROW_PARAMS_OFFSET", "act_params", "clamp_nan", "weight_scale_threshold"]

# Activation method codes shared with the GEMM kernels (constexpr ints).
ACT_CODES = {None: 0, "sym": 1, "asym": 2, "lsq": 3, "asym_lsq": 4}


def _configs(kernel: str, device: torch.device) -> tuple:
    """The launch config of a scale kernel on ``device`` (see ``configs.scales``)."""
    return configs.scales(kernel, configs.target_of(device))

# Per-token params: [lo, hi, 0, 0] then (zero, step) of row m at ROW_PARAMS_OFFSET + 2 * m.
ROW_PARAMS_OFFSET = 4


# tl.minimum / tl.maximum (and so tl.min / tl.max) drop NaN by default; torch's propagate it. These keep a NaN in x
# a NaN in its scale and output, as in the reference.
@triton.jit
def _maximum_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _minimum_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def clamp_nan(x, lo, hi):
    """``min(max(x, lo), hi)`` with NaN propagated, like ``torch.minimum(torch.maximum(x, lo), hi)``."""
    return _minimum_nan(_maximum_nan(x, lo), hi)


@triton.jit
def _row_abs_sum_kernel(
    w_ptr, threshold_ptr, out_ptr, count_ptr,
    N, K, stride_wn, stride_wk,
    HAS_THRESHOLD: tl.constexpr, THRESHOLD_PER_ROW: tl.constexpr, OUT_MODE: tl.constexpr, FACTOR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per row n: s = sum_k |w[n, k]| (only over |w| > delta when HAS_THRESHOLD), c = number of terms.

    OUT_MODE 0 stores s (and c) for a tensor-wide total; 1 stores FACTOR * (s / K); 2 stores s / c (0 if c = 0).
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    if HAS_THRESHOLD:
        if THRESHOLD_PER_ROW:
            delta = tl.load(threshold_ptr + offs_n, mask=mask_n, other=0.0)[:, None]  # [BN, 1]
        else:
            delta = tl.load(threshold_ptr)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BN, BK]
    total = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    count = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask = mask_n[:, None] & (offs_k[None, :] < K - k0)
        magnitude = tl.abs(tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32))  # [BN, BK]
        if HAS_THRESHOLD:
            keep = (magnitude > delta) & mask
            total += tl.where(keep, magnitude, 0.0)
            count += keep.to(tl.int32)
        else:
            total += magnitude
        w_ptrs += BLOCK_K * stride_wk
    row_sum = tl.sum(total, axis=1)  # [BN]
    row_count = tl.sum(count, axis=1)  # [BN]
    if OUT_MODE == 0:
        tl.store(out_ptr + offs_n, row_sum, mask=mask_n)
        if HAS_THRESHOLD:
            tl.store(count_ptr + offs_n, row_count, mask=mask_n)
    elif OUT_MODE == 1:
        tl.store(out_ptr + offs_n, tl.math.div_rn(row_sum, K * 1.0) * FACTOR, mask=mask_n)
    else:
        safe_count = tl.maximum(row_count, 1).to(tl.float32)
        value = tl.where(row_count > 0, tl.math.div_rn(row_sum, safe_count), 0.0)
        # A NaN / inf weight makes delta non-finite and no element passes it: NaN, not a silent 0 (the reference's).
        if THRESHOLD_PER_ROW:
            row_delta = tl.load(threshold_ptr + offs_n, mask=mask_n, other=0.0)
        else:
            row_delta = tl.load(threshold_ptr)
        value = tl.where(tl.abs(row_delta) < float("inf"), value, float("nan"))
        tl.store(out_ptr + offs_n, value, mask=mask_n)


@triton.jit
def _tensor_scale_kernel(
    sum_ptr, count_ptr, threshold_ptr, out_ptr, N, numel,
    MODE: tl.constexpr, FACTOR: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program over the row partials: MODE 1 -> FACTOR * (sum s / numel); MODE 2 -> sum s / sum c (0 if none;
    NaN if the threshold is not finite)."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int64)
    for n0 in range(0, N, BLOCK):
        mask = offs < N - n0
        total += tl.load(sum_ptr + n0 + offs, mask=mask, other=0.0)
        if MODE == 2:
            count += tl.load(count_ptr + n0 + offs, mask=mask, other=0).to(tl.int64)
    s = tl.sum(total, axis=0)
    if MODE == 1:
        value = tl.math.div_rn(s, numel * 1.0) * FACTOR
    else:
        c = tl.sum(count, axis=0)
        value = tl.where(c > 0, tl.math.div_rn(s, tl.maximum(c, 1).to(tl.float32)), 0.0)
        value = tl.where(tl.abs(tl.load(threshold_ptr)) < float("inf"), value, float("nan"))
    tl.store(out_ptr, value)


@triton.jit
def _act_minmax_kernel(
    x_ptr, clip_ptr, partial_ptr, M, K, stride_xm, stride_xk, stride_clip,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per program (BLOCK_M rows): min and max of clamp(x, lo, hi), stored to partial[pid, 0] and partial[pid, 1]."""
    pid = tl.program_id(0)
    lo = tl.load(clip_ptr).to(tl.float32)
    hi = tl.load(clip_ptr + stride_clip).to(tl.float32)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    low = tl.full([BLOCK_M, BLOCK_K], float("inf"), dtype=tl.float32)
    high = tl.full([BLOCK_M, BLOCK_K], float("-inf"), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K - k0)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        clamped = clamp_nan(x, lo, hi)
        low = _minimum_nan(low, tl.where(mask, clamped, float("inf")))
        high = _maximum_nan(high, tl.where(mask, clamped, float("-inf")))
        x_ptrs += BLOCK_K * stride_xk
    tl.store(partial_ptr + 2 * pid, tl.reduce(tl.reshape(low, [BLOCK_M * BLOCK_K]), 0, _minimum_nan))
    tl.store(partial_ptr + 2 * pid + 1, tl.reduce(tl.reshape(high, [BLOCK_M * BLOCK_K]), 0, _maximum_nan))


@triton.jit
def _act_row_params_kernel(
    x_ptr, clip_ptr, step_ptr, out_ptr, M, K, stride_xm, stride_xk, stride_clip,
    METHOD: tl.constexpr, QMAX: tl.constexpr, OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per-token (zero, step) of BLOCK_M rows of clamp(x, lo, hi), stored at out[OFFSET + 2 * m]; program 0 also
    stores (lo, hi, 0, 0). sym: step = max|x_c| / qmax; asym: zero = min(min x_c, 0),
    step = (max(max x_c, 0) - zero) / qmax; asym_lsq (clip = [-inf, inf]): zero = min(min x, 0), step = the
    learned step (also stored at out[3] for the grad_x kernel)."""
    pid = tl.program_id(0)
    lo = tl.load(clip_ptr).to(tl.float32)
    hi = tl.load(clip_ptr + stride_clip).to(tl.float32)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    low = tl.full([BLOCK_M, BLOCK_K], float("inf"), dtype=tl.float32)
    high = tl.full([BLOCK_M, BLOCK_K], float("-inf"), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = mask_m[:, None] & (offs_k[None, :] < K - k0)
        clamped = clamp_nan(tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32), lo, hi)
        low = _minimum_nan(low, tl.where(mask, clamped, float("inf")))
        high = _maximum_nan(high, tl.where(mask, clamped, float("-inf")))
        x_ptrs += BLOCK_K * stride_xk
    row_min = tl.reduce(low, 1, _minimum_nan)  # [BM]
    row_max = tl.reduce(high, 1, _maximum_nan)
    qmax = tl.full([BLOCK_M], QMAX, dtype=tl.float32)
    learned = 0.0
    if METHOD == 1:
        zero = tl.zeros([BLOCK_M], dtype=tl.float32)
        step = tl.math.div_rn(_maximum_nan(-row_min, row_max), qmax)
    elif METHOD == 4:
        learned = tl.load(step_ptr).to(tl.float32)
        zero = _minimum_nan(row_min, tl.zeros([BLOCK_M], dtype=tl.float32))
        step = tl.zeros([BLOCK_M], dtype=tl.float32) + learned
    else:
        # Per-token asym ranges include 0 (reference.act_params): masked zeros do not move a row's range.
        zero = _minimum_nan(row_min, tl.zeros([BLOCK_M], dtype=tl.float32))
        step = tl.math.div_rn(_maximum_nan(row_max, tl.zeros([BLOCK_M], dtype=tl.float32)) - zero, qmax)
    tl.store(out_ptr + OFFSET + 2 * offs_m, zero, mask=mask_m)
    tl.store(out_ptr + OFFSET + 2 * offs_m + 1, step, mask=mask_m)
    if pid == 0:
        tl.store(out_ptr, lo)
        tl.store(out_ptr + 1, hi)
        tl.store(out_ptr + 2, 0.0)
        tl.store(out_ptr + 3, learned)


@triton.jit
def _act_params_kernel(
    partial_ptr, num_partials, clip_ptr, stride_clip, step_ptr, out_ptr,
    METHOD: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = (lo, hi, zero, step). sym: step = max|x_c| / qmax; asym: zero = min x_c, step = (max - min) / qmax;
    lsq: (-inf, +inf, 0, s); asym_lsq (clip = [-inf, inf]): (-inf, +inf, min x, s)."""
    if METHOD == 3:
        lo = tl.full([], float("-inf"), dtype=tl.float32)
        hi = tl.full([], float("inf"), dtype=tl.float32)
        zero = tl.full([], 0.0, dtype=tl.float32)
        step = tl.load(step_ptr).to(tl.float32)
    else:
        lo = tl.load(clip_ptr).to(tl.float32)
        hi = tl.load(clip_ptr + stride_clip).to(tl.float32)
        offs = tl.arange(0, BLOCK)
        low = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        high = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        for i0 in range(0, num_partials, BLOCK):
            mask = offs < num_partials - i0
            low = _minimum_nan(low, tl.load(partial_ptr + 2 * (i0 + offs), mask=mask, other=float("inf")))
            high = _maximum_nan(high, tl.load(partial_ptr + 2 * (i0 + offs) + 1, mask=mask, other=float("-inf")))
        x_min = tl.reduce(low, 0, _minimum_nan)
        x_max = tl.reduce(high, 0, _maximum_nan)
        if METHOD == 1:
            zero = tl.full([], 0.0, dtype=tl.float32)
            step = tl.math.div_rn(_maximum_nan(-x_min, x_max), tl.full([], QMAX, dtype=tl.float32))
        elif METHOD == 4:
            zero = x_min
            step = tl.load(step_ptr).to(tl.float32)
        else:
            zero = x_min
            step = tl.math.div_rn(x_max - x_min, tl.full([], QMAX, dtype=tl.float32))
    tl.store(out_ptr, lo)
    tl.store(out_ptr + 1, hi)
    tl.store(out_ptr + 2, zero)
    tl.store(out_ptr + 3, step)


# Unused pointer arguments get a read-only input tensor (never an output: torch.compile tracks kernel mutations).
def _row_reduce(weight, threshold, out, count, out_mode, factor=1.0):
    n, k = weight.shape
    has_threshold = threshold is not None
    options = _configs("row", weight.device)
    launch(
        _row_abs_sum_kernel, (triton.cdiv(n, options[0].kwargs["BLOCK_N"]),), options,
        (weight, threshold if has_threshold else weight, out, count if count is not None else weight,
         n, k, weight.stride(0), weight.stride(1)),
        dict(HAS_THRESHOLD=has_threshold, THRESHOLD_PER_ROW=has_threshold and threshold.numel() > 1,
             OUT_MODE=out_mode, FACTOR=factor),
    )


def _tensor_reduce(row_sum, row_count, numel, mode, factor=1.0, threshold=None):
    out = new_output((), torch.float32, row_sum.device)
    launch(
        _tensor_scale_kernel, (1,), _configs("final", row_sum.device),
        (row_sum, row_count if row_count is not None else row_sum, row_sum if threshold is None else threshold, out,
         row_sum.numel(), numel),
        dict(MODE=mode, FACTOR=factor),
    )
    return out


def _mean_abs(weight, granularity, factor):
    n, k = weight.shape
    if granularity == "row":
        out = new_output((n, 1), torch.float32, weight.device)
        _row_reduce(weight, None, out, None, out_mode=1, factor=factor)
        return out
    row_sum = new_output((n,), torch.float32, weight.device)
    _row_reduce(weight, None, row_sum, None, out_mode=0)
    return _tensor_reduce(row_sum, None, n * k, mode=1, factor=factor)


def _twn_scale(weight, threshold, granularity):
    n, _ = weight.shape
    if granularity == "row":
        out = new_output((n, 1), torch.float32, weight.device)
        _row_reduce(weight, threshold, out, None, out_mode=2)
        return out
    row_sum = new_output((n,), torch.float32, weight.device)
    row_count = new_output((n,), torch.int32, weight.device)
    _row_reduce(weight, threshold, row_sum, row_count, out_mode=0)
    return _tensor_reduce(row_sum, row_count, n * weight.shape[1], mode=2, threshold=threshold)


def weight_scale_threshold(
    weight: torch.Tensor, method: str, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(alpha, delta)`` of ``bwn`` (``delta`` is ``None``) or ``twn``: shape ``[]`` (tensor) or ``[N, 1]`` (row).

    Equals ``triton_bq.reference.weight_scale_threshold`` to rtol 1e-6 (float32, summation order differs).
    """
    check_kernel_tensor("weight", weight)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D tensor, got shape {tuple(weight.shape)}")
    if granularity not in reference.GRANULARITIES:
        raise ValueError(f"granularity must be one of {reference.GRANULARITIES}, got {granularity!r}")
    if method == "bwn":
        return _mean_abs(weight, granularity, 1.0), None
    if method == "twn":
        threshold = _mean_abs(weight, granularity, reference.TWN_THRESHOLD_FACTOR)
        return _twn_scale(weight, threshold, granularity), threshold
    raise ValueError(f"weight_method must be 'bwn' or 'twn' to compute scales on the device, got {method!r}")


def act_params(
    x: torch.Tensor,
    method: str,
    bits: int,
    clip: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    signed: bool = True,
    granularity: str = "per_tensor",
    sync: bool = False,
) -> tuple[torch.Tensor, int, int]:
    """``(params, qmin, qmax)`` with ``params = [lo, hi, zero, step]`` (float32 device tensor) for a 2-D ``x``;
    per-token sym / asym append ``(zero, step)`` of row ``m`` at ``ROW_PARAMS_OFFSET + 2 * m``.

    Same values as ``triton_bq.reference.act_params``; per-tensor sym / asym reduce ``clamp(x, lo, hi)`` in two
    small launches (with ``sync``, one all-reduce of the min / max in between), per-token in one. ``asym_lsq``
    reduces the unclipped ``x`` the same way (its clip is ``[-inf, inf]``): per token, every row's step is the
    learned step.
    """
    check_choice("act_granularity", granularity, ACT_GRANULARITIES)
    qmin, qmax = reference.act_qrange(method, bits, signed)
    # The kernels divide by qmax for sym / asym only (LSQ and asym_lsq learn the step): one specialization else.
    read_qmax = qmax if method in ("sym", "asym") else 0
    if method == "lsq":
        if step is None or step.numel() != 1:
            raise ValueError(f"act_method='lsq' needs a one-element act_step, got {step!r}")
        params = new_output((4,), torch.float32, x.device)
        step = step.detach().reshape(1)
        # No partials to reduce: the smallest block.
        launch(
            _act_params_kernel, (1,), (configs.config(4, 3, BLOCK=2),), (step, 0, step, 1, step, params),
            dict(METHOD=ACT_CODES[method], QMAX=read_qmax),
        )
        return params, qmin, qmax
    step_operand = None
    if method == "asym_lsq":
        if step is None or step.numel() != 1:
            raise ValueError(f"act_method='asym_lsq' needs a one-element act_step, got {step!r}")
        step_operand = step.detach().reshape(1)
        # BinaryBERT's min is of the raw input: an infinite clip makes the min-max reductions' clamp a no-op.
        clip = torch.tensor([-float("inf"), float("inf")], dtype=torch.float32, device=x.device)
    if clip is None or clip.numel() != 2:
        raise ValueError(f"act_method={method!r} needs act_clip with 2 elements (lo, hi), got {clip!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, features] here, got shape {tuple(x.shape)}")
    clip = clip.detach().reshape(2)
    step_operand = clip if step_operand is None else step_operand
    m, k = x.shape
    options = _configs("act", x.device)
    if granularity == "per_token":
        params = new_output((ROW_PARAMS_OFFSET + 2 * m,), torch.float32, x.device)
        launch(
            _act_row_params_kernel, (max(triton.cdiv(m, options[0].kwargs["BLOCK_M"]), 1),), options,
            (x, clip, step_operand, params, m, k, x.stride(0), x.stride(1), clip.stride(0)),
            dict(METHOD=ACT_CODES[method], QMAX=read_qmax, OFFSET=ROW_PARAMS_OFFSET),
        )
        return params, qmin, qmax
    params = new_output((4,), torch.float32, x.device)
    num_partials = triton.cdiv(m, options[0].kwargs["BLOCK_M"])
    partials = new_output((num_partials, 2), torch.float32, x.device)
    launch(
        _act_minmax_kernel, (num_partials,), options,
        (x, clip, partials, m, k, x.stride(0), x.stride(1), clip.stride(0)), {},
    )
    if reference.sync_world_size(sync) > 1:
        low, high = reference.all_reduce_min_max(partials[:, 0].amin(), partials[:, 1].amax())
        partials, num_partials = torch.stack([low, high]).reshape(1, 2), 1
    launch(
        _act_params_kernel, (1,), _configs("final", x.device),
        (partials, num_partials, clip, clip.stride(0), step_operand, params),
        dict(METHOD=ACT_CODES[method], QMAX=read_qmax),
    )
    return params, qmin, qmax
