"""Fused quantized linear: binary / ternary weights and fake-quantized activations inside the GEMMs.

Forward ``y = x_hat @ w_q^T + bias`` and the straight-through backward run as three Triton GEMMs that load
the latent weight and the raw activation and quantize each tile in registers, so ``w_q`` and ``x_hat`` never
exist in memory. The dots multiply exact integer codes (weight codes in {-1, 0, +1}, activation codes ``q`` in
``[qmin, qmax]``, exact in bf16 / fp16 / tf32); ``alpha``, ``step`` and ``zero`` are applied in the epilogues.

Each GEMM is computed transposed where that puts the operand quantized in registers on the left of ``tl.dot``:
on Hopper the left wgmma operand is read from registers, so the MMA runs asynchronously while the next tiles load.
The arithmetic contract is ``docs/design.md``; tiling, byte and FLOP counts are in ``docs/kernels.md``.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_bq import reference
from triton_bq.options import QuantOptions

from . import _common, configs, scales
from ._common import check_kernel_tensor, dot, grouped_tile, int_dot, launch, new_output, round_half_even, to_dtype
from .scales import ROW_PARAMS_OFFSET, clamp_nan

__all__ = ["ACT_PATHS", "FORWARD_DOTS", "WEIGHT_PATHS", "act_path", "forward_dot", "fused_quant_linear", "set_act_path",
           "set_forward_dot", "set_weight_path", "weight_path"]

_WEIGHT_CODES = {None: 0, "bwn": 1, "twn": 2, "lat": 2}
_NONE, _SYM, _ASYM, _LSQ, _ASYM_LSQ = (scales.ACT_CODES[name] for name in (None, "sym", "asym", "lsq", "asym_lsq"))

# How the activation codes reach the forward and grad_w GEMMs (see docs/kernels.md):
# "fused": quantized in registers from x inside the GEMM main loops (no extra memory);
# "codes": one elementwise pass writes the integer codes q in the dot dtype to a transient buffer (freed after
# the GEMM, never saved for backward) and the GEMM streams them like a plain operand.
# Chosen with set_act_path / act_path (below); a plain module global, so torch.compile guards on it.
# The weight codes reach the forward and grad_x GEMMs the same two ways: "fused" (ternarized / binarized from the
# latent weight inside the main loops) or "codes" (one elementwise pass writes them in the dot dtype, grad_x's
# already times a per-row alpha, to a transient buffer freed after the GEMM). "codes" is the default for both:
# the main loops are then a plain dot (docs/kernels.md, instruction counts); each pass costs a write and a read of
# the codes and one more launch (docs/kernels.md, cost model).
ACT_PATHS = ("fused", "codes")
WEIGHT_PATHS = ("fused", "codes")
_ACT_PATH = "codes"
_WEIGHT_PATH = "codes"


# The forward's dot on the codes paths when both codes fit int8 (A8 sym, A4 LSQ / asym LSQ, ...): "float" (the codes
# in the compute dtype; default) or "int8" (integer tensor cores, int32 accumulator). Both are exact for finite x;
# a NaN in x has no int8 code, so "int8" does not propagate it to y as the reference does.
FORWARD_DOTS = ("int8", "float")
_FORWARD_DOT = "float"
_CHOICES = {"act": ACT_PATHS, "weight": WEIGHT_PATHS, "forward_dot": FORWARD_DOTS}


def _set_path(kind: str, path: str) -> str:
    name = f"_{kind.upper()}_PATH" if kind != "forward_dot" else "_FORWARD_DOT"
    if path not in _CHOICES[kind]:
        raise ValueError(f"{kind} {'path ' if kind != 'forward_dot' else ''}must be one of {_CHOICES[kind]}, "
                         f"got {path!r}")
    previous = globals()[name]
    globals()[name] = path
    return previous


@contextlib.contextmanager
def _using_path(kind: str, path: str):
    previous = _set_path(kind, path)
    try:
        yield path
    finally:
        _set_path(kind, previous)


def set_act_path(path: str) -> str:
    """Make ``path`` (``"fused"`` or ``"codes"``) the activation path of later calls; returns the previous one."""
    return _set_path("act", path)


def act_path(path: str):
    """``with act_path("fused"): ...`` runs the block on that activation path and restores the previous one."""
    return _using_path("act", path)


def set_weight_path(path: str) -> str:
    """Make ``path`` (``"fused"`` or ``"codes"``) the weight path of later calls; returns the previous one."""
    return _set_path("weight", path)


def weight_path(path: str):
    """``with weight_path("fused"): ...`` runs the block on that weight path and restores the previous one."""
    return _using_path("weight", path)


def set_forward_dot(kind: str) -> str:
    """Make ``kind`` (``"float"``, the default, or ``"int8"``: integer tensor cores where both codes fit int8) the
    forward dot of later calls on the codes paths; returns the previous one. ``"int8"`` does not propagate a NaN
    in x to y."""
    return _set_path("forward_dot", kind)


def forward_dot(kind: str):
    """``with forward_dot("int8"): ...`` runs the block with that forward dot and restores the previous one."""
    return _using_path("forward_dot", kind)


# Where the per-token (zero, step) pairs start in the params vector, as a constexpr the kernels can read (a plain
# int global compiles only under the interpreter).
_ROW_OFFSET = tl.constexpr(ROW_PARAMS_OFFSET)

# grad_x writes clip / LSQ-step partial sums per SLOT_M x SLOT_K block of x (see configs.linear_slots).
_SLOT_M, _SLOT_K = configs.linear_slots()


@triton.jit
def _weight_codes(w, delta, W_MODE: tl.constexpr):
    """BWN: c = +1 if w >= 0 else -1 (sign(0) = +1); ternary: c = 1[w > delta] - 1[w < -delta]; else c = w."""
    # Compare in float32 (exact for every input dtype), as the reference does with w.float().
    if W_MODE == 1:
        c = tl.where(w.to(tl.float32) >= 0, 1.0, -1.0)
    elif W_MODE == 2:
        wf = w.to(tl.float32)
        c = tl.where(wf > delta, 1.0, tl.where(wf < -delta, -1.0, 0.0))
    else:
        c = w
    return c


@triton.jit
def _act_codes(x, lo, hi, zero, safe, QMIN: tl.constexpr, QMAX: tl.constexpr, ACT: tl.constexpr):
    """q = clamp(round_half_even((clamp(x, lo, hi) - zero) / safe), qmin, qmax) as integer-valued float32.
    ACT 1 / 2 (sym / asym) clip; ACT 2 / 4 (asym / asym_lsq) subtract the zero point."""
    # NaN propagates through both clamps (as in torch), so a NaN input gives a NaN code and output.
    v = x.to(tl.float32)
    if ACT == 1 or ACT == 2:
        v = clamp_nan(v, lo, hi)
    if ACT == 2 or ACT == 4:
        v = v - zero
    v = tl.math.div_rn(v, safe)
    # Clamping to the integer bounds before rounding gives the same code and keeps |v| < 2**22 for the rounding.
    v = clamp_nan(v, QMIN * 1.0, QMAX * 1.0)
    return round_half_even(v)


@triton.jit
def _load_act_params(act_ptr, ACT: tl.constexpr):
    """(lo, hi, zero, step, safe) with safe = step if step > 0 else 1; zeros when there is no activation quant."""
    lo, hi, zero, step, safe = 0.0, 0.0, 0.0, 0.0, 1.0
    if ACT != 0:
        lo = tl.load(act_ptr)
        hi = tl.load(act_ptr + 1)
        zero = tl.load(act_ptr + 2)
        step = tl.load(act_ptr + 3)
        safe = tl.where(step > 0, step, 1.0)
    return lo, hi, zero, step, safe


@triton.jit
def _load_row_params(act_ptr, rows, mask, OFFSET: tl.constexpr):
    """Per-token (zero, step, safe) of the given rows (masked rows read zero, step 0, safe 1)."""
    zero = tl.load(act_ptr + OFFSET + 2 * rows, mask=mask, other=0.0)
    step = tl.load(act_ptr + OFFSET + 2 * rows + 1, mask=mask, other=0.0)
    return zero, step, tl.where(step > 0, step, 1.0)


@triton.jit
def _act_codes_kernel(
    x_ptr, act_ptr, q_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_qk,
    ACT: tl.constexpr, ACT_PER_ROW: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, DEQUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """q = clamp(round_half_even((clamp(x, lo, hi) - zero) / safe), qmin, qmax), stored exactly in q's dtype;
    DEQUANT (per-token scales): x_hat = q * step[m] + zero[m] instead, rounded to q's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)  # [BM, BK]
    lo, hi, zero, step, safe = _load_act_params(act_ptr, ACT)
    if ACT_PER_ROW:
        row_zero, row_step, row_safe = _load_row_params(act_ptr, offs_m, offs_m < M, _ROW_OFFSET)
        zero, safe = row_zero[:, None], row_safe[:, None]
    q = _act_codes(x, lo, hi, zero, safe, QMIN, QMAX, ACT)
    if DEQUANT:
        q = to_dtype(q * row_step[:, None] + row_zero[:, None], q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_codes_kernel(
    w_ptr, alpha_ptr, delta_ptr, c_ptr, N, K, stride_wn, stride_wk, stride_cn, stride_ck,
    W_MODE: tl.constexpr, DELTA_PER_ROW: tl.constexpr, SCALE_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c = the weight codes of w (``_weight_codes``), times alpha[n] if SCALE_ROWS, stored in c's dtype (the GEMM's
    dot dtype, rounded as the fused loops round them)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    delta = 0.0
    if W_MODE == 2:
        if DELTA_PER_ROW:
            delta = tl.load(delta_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        else:
            delta = tl.load(delta_ptr)
    c = _weight_codes(w, delta, W_MODE)
    if SCALE_ROWS:
        c = c * tl.load(alpha_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    tl.store(c_ptr + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck, to_dtype(c, c_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _quant_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, alpha_ptr, delta_ptr, act_ptr, csum_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    W_MODE: tl.constexpr, W_CODES: tl.constexpr, ALPHA_PER_ROW: tl.constexpr, DELTA_PER_ROW: tl.constexpr,
    ACT: tl.constexpr, ACT_PER_ROW: tl.constexpr, X_CODES: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INT8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """y^T = alpha * (step * (c @ q^T) + zero * sum_k c) + bias, i.e. y = x_hat @ (alpha * c)^T + bias with
    x_hat = q * step + zero. ACT_PER_ROW: step and zero are per token (a column of the y^T tile), applied in the
    same epilogue. X_CODES: x_ptr already holds q (integer codes in y's dtype); W_CODES: w_ptr already holds c (in
    y's dtype) and, for an asymmetric x, csum_ptr holds sum_k c per output feature. INT8: both hold int8 codes and
    the dot runs on integer tensor cores into an int32 accumulator (exact, as the float32 one is)."""
    dot_dtype = y_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped row / column indices keep loads in bounds without masks; the store drops the wrapped ones.
    rows = offs_m % M
    cols = offs_n % N
    w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BN, BK]
    xt_ptrs = x_ptr + offs_k[:, None] * stride_xk + rows[None, :] * stride_xm  # [BK, BM]
    delta = 0.0
    if W_MODE == 2 and not W_CODES:
        if DELTA_PER_ROW:
            delta = tl.load(delta_ptr + cols)[:, None]  # [BN, 1]
        else:
            delta = tl.load(delta_ptr)
    lo, hi, zero, step, safe = _load_act_params(act_ptr, ACT)
    if ACT_PER_ROW:
        row_zero, row_step, row_safe = _load_row_params(act_ptr, rows, rows < M, _ROW_OFFSET)
        zero, step, safe = row_zero[None, :], row_step[None, :], row_safe[None, :]  # [1, BM]
    if INT8:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    code_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0)  # [BN, BK]
        xt = tl.load(xt_ptrs, mask=mask_k[:, None], other=0.0)  # [BK, BM]
        if W_CODES:
            c = w  # streamed codes: the K tail loads as 0
        elif ACT == 2 or ACT == 4:
            # The asym code of a padded x is not 0 and sign(0) = +1: zero the K tail of c for the dot and the sum.
            c = to_dtype(tl.where(mask_k[None, :], _weight_codes(w, delta, W_MODE), 0.0), dot_dtype)
            code_sum += tl.sum(c.to(tl.float32), axis=1)
        else:
            c = to_dtype(_weight_codes(w, delta, W_MODE), dot_dtype)
        if INT8:
            acc = int_dot(c, xt, acc)
        else:
            if ACT == 0 or X_CODES:
                b = to_dtype(xt, dot_dtype)
            else:
                b = _act_codes(xt, lo, hi, zero, safe, QMIN, QMAX, ACT).to(dot_dtype)
            acc = dot(c, b, acc, PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        xt_ptrs += BLOCK_K * stride_xk
    acc = acc.to(tl.float32)
    if ACT != 0:
        acc = acc * step
        if ACT == 2 or ACT == 4:
            if W_CODES:
                code_sum = tl.load(csum_ptr + cols)
            acc += zero * code_sum[:, None]
    if W_MODE != 0:
        if ALPHA_PER_ROW:
            acc = acc * tl.load(alpha_ptr + cols)[:, None]
        else:
            acc = acc * tl.load(alpha_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(y_ptr + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym, to_dtype(acc, dot_dtype), mask=mask)


@triton.jit
def _store_slot_sums(
    partial_ptr, values, channel, pid_k, pid_m, num_slot_m, num_slot_k,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, SLOT_K: tl.constexpr, SLOT_M: tl.constexpr,
):
    """partial[i, j, channel] = sum of a [BK, BM] tile over slot (i, j), its SLOT_K x SLOT_M block at x[i, j]."""
    blocks = tl.reshape(values, [BLOCK_K // SLOT_K, SLOT_K, BLOCK_M // SLOT_M, SLOT_M])
    sums = tl.sum(tl.sum(blocks, axis=3), axis=1)  # [BK // SLOT_K, BM // SLOT_M]
    slot_k = pid_k * (BLOCK_K // SLOT_K) + tl.arange(0, BLOCK_K // SLOT_K)
    slot_m = pid_m * (BLOCK_M // SLOT_M) + tl.arange(0, BLOCK_M // SLOT_M)
    mask = (slot_k[:, None] < num_slot_k) & (slot_m[None, :] < num_slot_m)
    tl.store(partial_ptr + (slot_m[None, :] * num_slot_k + slot_k[:, None]) * 2 + channel, sums, mask=mask)


@triton.jit
def _quant_linear_bwd_x_kernel(
    gy_ptr, w_ptr, x_ptr, gx_ptr, alpha_ptr, delta_ptr, act_ptr, partial_ptr,
    M, N, K, num_slot_m, num_slot_k,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_xm, stride_xk, stride_gxm, stride_gxk,
    W_MODE: tl.constexpr, W_CODES: tl.constexpr, ALPHA_PER_ROW: tl.constexpr, DELTA_PER_ROW: tl.constexpr,
    ACT: tl.constexpr, ACT_PER_ROW: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    STORE_GRAD_X: tl.constexpr, PARTIALS: tl.constexpr, PRECISION: tl.constexpr,
    SLOT_M: tl.constexpr, SLOT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """g^T = (alpha * c)^T @ grad_y^T is the grad of x_hat; grad_x = g * 1[lo < x < hi] (clip),
    g * 1[qmin < x/s < qmax] (LSQ) or g * 1[0 <= (x - zero)/s <= qmax] (asym_lsq: BinaryBERT's strict tests; zero
    per token when ACT_PER_ROW). PARTIALS: per-slot sums of g over x <= lo and x >= hi, or of g * dq/ds. W_CODES:
    w_ptr already holds c in grad_y's dtype (times alpha[n] when ALPHA_PER_ROW)."""
    dot_dtype = gy_ptr.dtype.element_ty
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_k % K
    wt_ptrs = w_ptr + cols[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BK, BN]
    gyt_ptrs = gy_ptr + offs_n[:, None] * stride_gn + rows[None, :] * stride_gm  # [BN, BM]
    delta = 0.0
    if W_MODE == 2 and not DELTA_PER_ROW and not W_CODES:
        delta = tl.load(delta_ptr)
    acc = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        wt = tl.load(wt_ptrs, mask=mask_n[None, :], other=0.0)  # [BK, BN]
        gyt = tl.load(gyt_ptrs, mask=mask_n[:, None], other=0.0)  # [BN, BM]
        if W_CODES:
            c = wt
        else:
            if W_MODE == 2 and DELTA_PER_ROW:
                row_delta = tl.load(delta_ptr + n0 + offs_n, mask=mask_n, other=0.0)[None, :]  # [1, BN]
                c = _weight_codes(wt, row_delta, W_MODE)
            else:
                c = _weight_codes(wt, delta, W_MODE)
            if W_MODE != 0 and ALPHA_PER_ROW:
                # alpha varies along this reduction, so it scales the codes (w_q rounded like the reference's).
                c = c * tl.load(alpha_ptr + n0 + offs_n, mask=mask_n, other=0.0)[None, :]
        acc = dot(to_dtype(c, dot_dtype), gyt.to(dot_dtype), acc, PRECISION)
        wt_ptrs += BLOCK_N * stride_wn
        gyt_ptrs += BLOCK_N * stride_gn
    if W_MODE != 0 and not ALPHA_PER_ROW:
        acc = acc * tl.load(alpha_ptr)
    valid = (offs_k[:, None] < K) & (offs_m[None, :] < M)
    if ACT != 0:
        xt = tl.load(x_ptr + cols[:, None] * stride_xk + rows[None, :] * stride_xm).to(tl.float32)  # [BK, BM]
        if ACT == 3:
            v = tl.math.div_rn(xt, tl.load(act_ptr + 3))
            below = v <= QMIN
            above = v >= QMAX
        elif ACT == 4:
            if ACT_PER_ROW:
                row_zero, _, _ = _load_row_params(act_ptr, rows, rows < M, _ROW_OFFSET)
                v = tl.math.div_rn(xt - row_zero[None, :], tl.load(act_ptr + 3))
            else:
                v = tl.math.div_rn(xt - tl.load(act_ptr + 2), tl.load(act_ptr + 3))
            below = v < QMIN
            above = v > QMAX
        else:
            below = xt <= tl.load(act_ptr)
            above = xt >= tl.load(act_ptr + 1)
        if PARTIALS:
            if ACT == 3 or ACT == 4:
                inner = round_half_even(tl.minimum(tl.maximum(v, QMIN * 1.0), QMAX * 1.0)) - v
                local = tl.where(below, QMIN * 1.0, tl.where(above, QMAX * 1.0, inner))
                _store_slot_sums(
                    partial_ptr, tl.where(valid, acc * local, 0.0), 0, pid_k, pid_m, num_slot_m, num_slot_k,
                    BLOCK_K, BLOCK_M, SLOT_K, SLOT_M,
                )
            else:
                _store_slot_sums(
                    partial_ptr, tl.where(valid & below, acc, 0.0), 0, pid_k, pid_m, num_slot_m, num_slot_k,
                    BLOCK_K, BLOCK_M, SLOT_K, SLOT_M,
                )
                _store_slot_sums(
                    partial_ptr, tl.where(valid & above, acc, 0.0), 1, pid_k, pid_m, num_slot_m, num_slot_k,
                    BLOCK_K, BLOCK_M, SLOT_K, SLOT_M,
                )
        acc = tl.where(below | above, 0.0, acc)
    if STORE_GRAD_X:
        gx_ptrs = gx_ptr + offs_k[:, None] * stride_gxk + offs_m[None, :] * stride_gxm
        tl.store(gx_ptrs, to_dtype(acc, gx_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _quant_linear_bwd_w_kernel(
    gy_ptr, x_ptr, w_ptr, gw_ptr, act_ptr, gsum_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_gwn, stride_gwk,
    ACT: tl.constexpr, ACT_PER_ROW: tl.constexpr, X_CODES: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    CLIPPED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """grad_w^T = (step * q^T @ grad_y + zero * sum_m grad_y) * 1[|w| <= 1 if CLIPPED]: x_hat^T @ grad_y through
    the weight STE, reduced over the M tokens. ACT_PER_ROW: step and zero vary along this reduction, so they scale
    the codes in registers (x_hat rounded to the dot dtype like the reference's). X_CODES: x_ptr already holds q
    (integer codes in grad_y's dtype)."""
    dot_dtype = gy_ptr.dtype.element_ty
    pid_n, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    rows = offs_n % N
    cols = offs_k % K
    xt_ptrs = x_ptr + cols[:, None] * stride_xk + offs_m[None, :] * stride_xm  # [BK, BM]
    gy_ptrs = gy_ptr + offs_m[:, None] * stride_gm + rows[None, :] * stride_gn  # [BM, BN]
    lo, hi, zero, step, safe = _load_act_params(act_ptr, ACT)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mask_m = offs_m < M - m0
        xt = tl.load(xt_ptrs, mask=mask_m[None, :], other=0.0)  # [BK, BM]
        gy = tl.load(gy_ptrs, mask=mask_m[:, None], other=0.0)  # [BM, BN]
        if ACT_PER_ROW:
            row_zero, row_step, row_safe = _load_row_params(act_ptr, m0 + offs_m, mask_m, _ROW_OFFSET)
            if X_CODES:
                q = xt.to(tl.float32)
            else:
                q = _act_codes(xt, lo, hi, row_zero[None, :], row_safe[None, :], QMIN, QMAX, ACT)
            a = to_dtype(q * row_step[None, :] + row_zero[None, :], dot_dtype)
        elif ACT == 0 or X_CODES:
            a = to_dtype(xt, dot_dtype)
        else:
            a = _act_codes(xt, lo, hi, zero, safe, QMIN, QMAX, ACT).to(dot_dtype)
        acc = dot(a, gy.to(dot_dtype), acc, PRECISION)
        xt_ptrs += BLOCK_M * stride_xm
        gy_ptrs += BLOCK_M * stride_gm
    if ACT != 0 and not ACT_PER_ROW:
        acc = acc * step
        if ACT == 2 or ACT == 4:
            acc += zero * tl.load(gsum_ptr + rows)[None, :]
    if CLIPPED:
        wt = tl.load(w_ptr + cols[:, None] * stride_wk + rows[None, :] * stride_wn).to(tl.float32)  # [BK, BN]
        acc = tl.where(tl.abs(wt) <= 1.0, acc, 0.0)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    gw_ptrs = gw_ptr + offs_k[:, None] * stride_gwk + offs_n[None, :] * stride_gwn
    tl.store(gw_ptrs, to_dtype(acc, gw_ptr.dtype.element_ty), mask=mask)


class _Spec(NamedTuple):
    """Static options of one call (everything the kernels take as constexpr)."""

    weight_mode: int
    alpha_per_row: bool
    delta_per_row: bool
    clipped: bool
    act: int
    act_per_row: bool
    qmin: int
    qmax: int
    codes: bool
    weight_codes: bool
    int8: bool  # forward on int8 codes (both code paths, codes within int8, integer tensor cores)
    dtype: torch.dtype
    precision: str


def _configs(kernel: str, spec: _Spec, x: torch.Tensor, weight: torch.Tensor, partials: bool = False) -> tuple:
    """The launch configs of one GEMM for this call's device and operands (see ``configs.linear``); ``x`` is the
    operand the GEMM loads (x or the codes buffer)."""
    fused = spec.act != _NONE and not spec.codes
    dot_bytes = 1 if kernel == "fwd" and spec.int8 else spec.dtype.itemsize
    operands = configs.LinearOperands(
        x_bytes=x.element_size(), weight_bytes=weight.element_size(), dot_bytes=dot_bytes,
        act_fused=kernel != "bwd_x" and fused, partials=partials,
        weight_fused=kernel != "bwd_w" and spec.weight_mode != 0 and not spec.weight_codes,
        tf32=dot_bytes == 4 and spec.precision == "tf32",
        code_sum=kernel == "fwd" and spec.act in (_ASYM, _ASYM_LSQ) and not _streams_weight_codes(spec),
    )
    return configs.linear(kernel, configs.target_of(x.device), operands)


def _flat_scale(name: str, value: torch.Tensor, rows: int) -> torch.Tensor:
    """A given alpha / delta as a contiguous float32 vector of 1 (per tensor) or ``rows`` (per row) values."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.numel() not in (1, rows):
        raise ValueError(f"{name} must have 1 or out_features={rows} elements, got shape {tuple(value.shape)}")
    return value.detach().reshape(-1).to(torch.float32).contiguous()


def _weight_scales(weight, weight_method, granularity, weight_scale, weight_threshold):
    """``(alpha, delta)`` as float32 vectors of 1 or N values (``None`` where unused)."""
    if weight_method is None:
        return None, None
    rows = weight.shape[0]
    if weight_method != "bwn" and (weight_scale is None) != (weight_threshold is None):
        raise ValueError(
            f"weight_scale and weight_threshold must be given together for weight_method={weight_method!r}"
        )
    if weight_scale is None:
        alpha, delta = scales.weight_scale_threshold(weight, weight_method, granularity)
    else:
        alpha, delta = weight_scale, None if weight_method == "bwn" else weight_threshold
    alpha = _flat_scale("weight_scale", alpha, rows)
    return alpha, None if delta is None else _flat_scale("weight_threshold", delta, rows)


def _codes_pass(kernel, source, pointers: tuple, options: tuple, row_block: str, dtype: torch.dtype,
                constexprs: dict) -> torch.Tensor:
    """Run an elementwise codes kernel ``(source, *pointers, codes, rows, cols, strides)`` over ``source``'s
    [rows, cols] tiles (``row_block`` x BLOCK_K per program) into a new transient ``dtype`` buffer."""
    rows, cols = source.shape
    codes = new_output((rows, cols), dtype, source.device)
    block_rows, block_k = options[0].kwargs[row_block], options[0].kwargs["BLOCK_K"]
    launch(
        kernel, (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_k)), options,
        (source, *pointers, codes, rows, cols, source.stride(0), source.stride(1), codes.stride(0), codes.stride(1)),
        constexprs,
    )
    return codes


def _act_code_buffer(x, params, spec: _Spec, dequant: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The transient integer codes q of x in ``dtype`` (default: the dot dtype; "codes" activation path);
    ``dequant`` (per-token scales): x_hat = q * step + zero per token instead."""
    return _codes_pass(
        _act_codes_kernel, x, (params,), configs.act_codes(configs.target_of(x.device)), "BLOCK_M",
        dtype or spec.dtype,
        dict(ACT=spec.act, ACT_PER_ROW=spec.act_per_row, QMIN=spec.qmin, QMAX=spec.qmax, DEQUANT=dequant),
    )


def _weight_code_buffer(weight, alpha, delta, spec: _Spec, scale_rows: bool,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """The transient weight codes c (times alpha[n] if ``scale_rows``) in ``dtype`` (default: the dot dtype;
    "codes" weight path)."""
    return _codes_pass(
        _weight_codes_kernel, weight, (weight if alpha is None else alpha, weight if delta is None else delta),
        configs.weight_codes(configs.target_of(weight.device)), "BLOCK_N", dtype or spec.dtype,
        dict(W_MODE=spec.weight_mode, DELTA_PER_ROW=spec.delta_per_row, SCALE_ROWS=scale_rows),
    )


def _streams_weight_codes(spec: _Spec) -> bool:
    return spec.weight_codes and spec.weight_mode != 0


def _act_constexprs(spec: _Spec, kernel: str, x_codes: bool = False) -> dict:
    """The activation constexprs of one GEMM, with the values it does not read made canonical, so launches that
    compile to the same code share one specialization (one JIT compile, one autotuning). On streamed codes
    (``x_codes``) the forward and grad_w only scale: sym / LSQ and asym / asym_lsq look alike and the bounds go
    unread. grad_x tests the clip range for sym and asym alike, reads the bounds only for LSQ / asym_lsq and the
    per-token zero points only for asym_lsq."""
    act, per_row, bounds = spec.act, spec.act_per_row, (spec.qmin, spec.qmax)
    if kernel == "bwd_x":
        if act == _ASYM:
            act = _SYM
        per_row = per_row and act == _ASYM_LSQ
        if act not in (_LSQ, _ASYM_LSQ):
            bounds = (0, 0)
        return dict(ACT=act, ACT_PER_ROW=per_row, QMIN=bounds[0], QMAX=bounds[1])
    if act == _NONE:
        per_row, x_codes, bounds = False, False, (0, 0)
    elif x_codes:
        act = _ASYM if act in (_ASYM, _ASYM_LSQ) else _SYM
        bounds = (0, 0)
    return dict(ACT=act, ACT_PER_ROW=per_row, X_CODES=x_codes, QMIN=bounds[0], QMAX=bounds[1])


def _weight_constexprs(spec: _Spec, w_codes: bool) -> dict:
    """The weight constexprs of the forward / grad_x GEMM. Streamed codes look the same for BWN and TWN (one
    specialization: the method and the threshold only matter to the codes pass, so the GEMM gets no threshold
    pointer either)."""
    if w_codes:
        return dict(W_MODE=1, W_CODES=True, ALPHA_PER_ROW=spec.alpha_per_row, DELTA_PER_ROW=False)
    if spec.weight_mode == 0:
        return dict(W_MODE=0, W_CODES=False, ALPHA_PER_ROW=False, DELTA_PER_ROW=False)
    return dict(W_MODE=spec.weight_mode, W_CODES=False, ALPHA_PER_ROW=spec.alpha_per_row,
                DELTA_PER_ROW=spec.delta_per_row)


# Autotuning is keyed by the problem size (the autotuner adds the argument dtypes itself).
_AUTOTUNE_KEY = ("M", "N", "K")


# Unused pointer arguments get a read-only input tensor (never an output: torch.compile tracks kernel mutations).
def _forward(x, weight, bias, alpha, delta, params, spec: _Spec) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    x_codes = spec.codes and spec.act != _NONE
    code_dtype = torch.int8 if spec.int8 else None
    operand = _act_code_buffer(x, params, spec, dtype=code_dtype) if x_codes else x
    w_codes = _streams_weight_codes(spec)
    w_operand = weight
    if w_codes:
        w_operand, delta = _weight_code_buffer(weight, alpha, delta, spec, False, dtype=code_dtype), None
    code_sum = None
    if w_codes and spec.act in (_ASYM, _ASYM_LSQ):
        code_sum = w_operand.sum(dim=1, dtype=torch.float32)  # integers below 2**24: exact in any order
    y = new_output((m, n), spec.dtype, x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    args = (
        operand, w_operand, weight if bias is None else bias, y,
        weight if alpha is None else alpha, weight if delta is None else delta, weight if params is None else params,
        weight if code_sum is None else code_sum,
        m, n, k,
        operand.stride(0), operand.stride(1), w_operand.stride(0), w_operand.stride(1), y.stride(0), y.stride(1),
    )
    constexprs = dict(
        **_weight_constexprs(spec, w_codes), **_act_constexprs(spec, "fwd", x_codes),
        HAS_BIAS=bias is not None,
        # The integer dot has no float precision to choose.
        PRECISION="ieee" if spec.int8 else spec.precision, INT8=spec.int8,
    )
    options = _configs("fwd", spec, operand, w_operand)
    launch(_quant_linear_fwd_kernel, grid, options, args, constexprs, _AUTOTUNE_KEY)
    return y


def _backward_x(grad_y, weight, x, alpha, delta, params, spec: _Spec, store_grad_x: bool, partials: bool,
                grad_dtype: torch.dtype):
    """``(grad_x in grad_dtype or None, partial sums [slots_m, slots_k, 2] or None)``."""
    m, k = x.shape
    n = weight.shape[0]
    w_codes = _streams_weight_codes(spec)
    weights = _weight_constexprs(spec, w_codes)
    if w_codes:
        weight, delta = _weight_code_buffer(weight, alpha, delta, spec, spec.alpha_per_row), None
        if spec.alpha_per_row:
            # The pass folds alpha[n] into the codes: the GEMM is a plain one, as without weight quantization.
            weights, alpha = _weight_constexprs(spec._replace(weight_mode=0), False), None
    grad_x = new_output((m, k), grad_dtype, x.device) if store_grad_x else None
    num_slot_m, num_slot_k = triton.cdiv(m, _SLOT_M), triton.cdiv(k, _SLOT_K)
    partial = new_output((num_slot_m, num_slot_k, 2), torch.float32, x.device) if partials else None
    target = grad_y if grad_x is None else grad_x
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    args = (
        grad_y, weight, x, target,
        grad_y if alpha is None else alpha, grad_y if delta is None else delta,
        grad_y if params is None else params, grad_y if partial is None else partial,
        m, n, k, num_slot_m, num_slot_k,
        grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
        target.stride(0), target.stride(1),
    )
    constexprs = dict(
        **weights, **_act_constexprs(spec, "bwd_x"),
        STORE_GRAD_X=store_grad_x, PARTIALS=partials,
        PRECISION=spec.precision, SLOT_M=_SLOT_M, SLOT_K=_SLOT_K,
    )
    options = _configs("bwd_x", spec, x, weight, partials)
    launch(_quant_linear_bwd_x_kernel, grid, options, args, constexprs, _AUTOTUNE_KEY)
    return grad_x, partial


def _backward_w(grad_y, x, weight, params, grad_sum, spec: _Spec) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    x_codes = spec.codes and spec.act != _NONE
    # Per-token step and zero vary along grad_w's reduction: the pass writes x_hat itself and the GEMM is plain.
    x_hat = x_codes and spec.act_per_row
    operand = _act_code_buffer(x, params, spec, dequant=x_hat) if x_codes else x
    act = _act_constexprs(spec._replace(act=_NONE) if x_hat else spec, "bwd_w", x_codes)
    # Only the pointers the GEMM reads (the others get grad_y): the same code, whatever was computed beside it.
    if act["ACT"] == _NONE:
        params = None
    if act["ACT"] not in (_ASYM, _ASYM_LSQ) or act["ACT_PER_ROW"]:
        grad_sum = None
    grad_w = new_output((n, k), weight.dtype, weight.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    args = (
        grad_y, operand, weight, grad_w, grad_y if params is None else params,
        grad_y if grad_sum is None else grad_sum,
        m, n, k,
        grad_y.stride(0), grad_y.stride(1), operand.stride(0), operand.stride(1),
        weight.stride(0), weight.stride(1), grad_w.stride(0), grad_w.stride(1),
    )
    constexprs = dict(**act, CLIPPED=spec.clipped, PRECISION=spec.precision)
    launch(_quant_linear_bwd_w_kernel, grid, _configs("bwd_w", spec, operand, weight), args, constexprs, _AUTOTUNE_KEY)
    return grad_w


class _FusedQuantLinear(torch.autograd.Function):
    """Saves x (2-D), the latent weight and the float32 scalars alpha / delta / (lo, hi, zero, step) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_scale, weight_threshold, act_clip, act_step, options, dtype, precision,
                act_path, weight_path, forward_dot):
        weight_method, act_method = options.weight_method, options.act_method
        n, k = weight.shape
        x2 = x.reshape(-1, k)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        if bias is not None and bias.stride(0) != 1:
            bias = bias.contiguous()
        alpha, delta = _weight_scales(weight, weight_method, options.granularity, weight_scale, weight_threshold)
        act = scales.ACT_CODES[act_method]
        ctx.x_dtype = x.dtype
        if act == _NONE and x2.dtype != dtype:
            # Unquantized x reaches the GEMMs in the dot dtype: cast once (as autocast casts F.linear's input), so
            # the forward streams it to the tensor cores and the saved copy is the smaller one. Same rounding as a
            # cast in the main loop.
            x2 = x2.to(dtype)
        params, (qmin, qmax) = None, (0, 0)
        # The LSQ step is learned (one value whatever the granularity); sym / asym scales and the asym_lsq zero
        # point are per token.
        act_per_row = act in (_SYM, _ASYM, _ASYM_LSQ) and options.act_granularity == "per_token"
        if act != _NONE:
            qmin, qmax = reference.act_qrange(act_method, options.act_bits, options.act_signed)
            if x2.shape[0] > 0:
                params, _, _ = scales.act_params(x2, act_method, options.act_bits, act_clip, act_step,
                                                 options.act_signed, options.act_granularity, options.act_sync)
        spec = _Spec(
            weight_mode=_WEIGHT_CODES[weight_method],
            alpha_per_row=alpha is not None and alpha.numel() > 1,
            delta_per_row=delta is not None and delta.numel() > 1,
            clipped=weight_method is not None and options.ste == "clipped",
            act=act, act_per_row=act_per_row, qmin=qmin, qmax=qmax, codes=act_path == "codes",
            weight_codes=weight_path == "codes",
            int8=(forward_dot == "int8" and act_path == "codes" and weight_path == "codes" and act != _NONE
                  and weight_method is not None and -128 <= qmin and qmax <= 127),
            dtype=dtype,
            precision=precision,
        )
        if x2.shape[0] == 0:
            y = torch.zeros((0, n), dtype=dtype, device=x.device)
        else:
            y = _forward(x2, weight, bias, alpha, delta, params, spec)
        ctx.save_for_backward(x2, weight, alpha, delta, params)
        ctx.spec = spec
        ctx.sync = options.act_sync
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        param = act_step if act in (_LSQ, _ASYM_LSQ) else act_clip
        ctx.act_param_meta = None if param is None else (param.dtype, param.shape)
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, alpha, delta, params = ctx.saved_tensors
        spec: _Spec = ctx.spec
        m, k = x2.shape
        n = weight.shape[0]
        needs = ctx.needs_input_grad
        learned_step = spec.act in (_LSQ, _ASYM_LSQ)
        need_act = spec.act != _NONE and needs[6 if learned_step else 5]
        grad_y = grad_y.reshape(-1, n)
        grad_x = grad_w = grad_bias = grad_clip = grad_step = None
        partial_sum = torch.zeros(2, dtype=torch.float32, device=x2.device)
        if m == 0:
            grad_x = x2.new_zeros(ctx.x_shape, dtype=ctx.x_dtype) if needs[0] else None
            grad_w = torch.zeros_like(weight) if needs[1] else None
        elif needs[0] or need_act:
            grad_x, partial = _backward_x(grad_y, weight, x2, alpha, delta, params, spec, needs[0], need_act,
                                          ctx.x_dtype)
            if grad_x is not None:
                grad_x = grad_x.reshape(ctx.x_shape)
            if partial is not None:
                partial_sum = partial.sum(dim=(0, 1))
        grad_sum = None
        if needs[2] or (m > 0 and needs[1] and spec.act in (_ASYM, _ASYM_LSQ) and not spec.act_per_row):
            grad_sum = grad_y.sum(dim=0, dtype=torch.float32)
        if m > 0 and needs[1]:
            grad_w = _backward_w(grad_y, x2, weight, params, grad_sum, spec)
        if needs[2]:
            grad_bias = grad_sum.to(ctx.bias_dtype)
        if need_act:
            dtype, shape = ctx.act_param_meta
            if learned_step:
                scale = reference.lsq_grad_scale(m * k, spec.qmax, ctx.sync)
                grad_step = (partial_sum[0] * scale).to(dtype).reshape(shape)
            else:
                grad_clip = partial_sum.to(dtype).reshape(shape)
        return grad_x, grad_w, grad_bias, None, None, grad_clip, grad_step, None, None, None, None, None, None


@torch.compiler.assume_constant_result
def _fp32_dot_precision() -> str:
    """Follow torch's float32 matmul setting: IEEE fp32 for "highest" (torch's default), TF32 otherwise."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def fused_quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    options: QuantOptions,
    *,
    weight_scale: torch.Tensor | None = None,
    weight_threshold: torch.Tensor | None = None,
    act_clip: torch.Tensor | None = None,
    act_step: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``quant_linear`` (the arguments of ``triton_bq.reference.quant_linear``, validated by
    ``triton_bq.ops``). Output dtype: the autocast dtype when autocast is on, else ``x.dtype``.

    float32 dots are IEEE when ``torch.get_float32_matmul_precision() == "highest"`` (torch's default), else TF32.
    """
    if not isinstance(options, QuantOptions):
        raise TypeError(f"options must be a triton_bq.QuantOptions, got {type(options).__name__}")
    check_kernel_tensor("x", x)
    check_kernel_tensor("weight", weight)
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on the same device, got {x.device} and {weight.device}")
    if bias is not None and bias.device != weight.device:
        raise ValueError(f"bias must be on {weight.device} like weight, got {bias.device}")
    dtype = _compute_dtype(x)
    if dtype not in _common.SUPPORTED_DTYPES:
        raise TypeError(f"the compute dtype (autocast or x's) must be float32, bfloat16 or float16, got {dtype}")
    precision = _fp32_dot_precision() if dtype == torch.float32 else "tf32"
    return _FusedQuantLinear.apply(
        x, weight, bias, weight_scale, weight_threshold, act_clip, act_step, options, dtype, precision, _ACT_PATH,
        _WEIGHT_PATH, _FORWARD_DOT,
    )
