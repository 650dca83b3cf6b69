"""Inference matmul on packed 1-bit / 2-bit weights: ``y = x_scale * (x @ W^T) + bias``, ``W = sum_p alpha_p * c_p``.

The weight arrives as int32 words in the ``triton_bq.bitpack`` format (``[P, N, KW]``, packed along K; binary
bit 1 = +1 / bit 0 = -1; ternary field 1 = +1, field 2 = -1, field 0 = 0) and is unpacked in registers only.

- ``_packed_gemv_kernel`` (M <= ``GEMV_MAX_M`` = 2): CUDA-core GEMV for decoding, bound by the weight words.
  A program streams a ``[BLOCK_N, BLOCK_KW]`` tile of words (contiguous along K: 16-byte vector loads), walks the
  ``32 // bits`` fields with constant shifts and, per weight, tests one bit and adds ``x`` under that predicate
  into an elementwise ``[BLOCK_M, BLOCK_N, BLOCK_KW]`` accumulator reduced once at the end (binary:
  ``sum c x = 2 sum_{bit} x - sum x``; ternary: one predicated add and one predicated subtract). No multiply, no
  int-to-float conversion of codes; shapes that tile evenly load without masks. Split-K over words adds programs
  when ``N / BLOCK_N`` alone cannot fill the GPU.
- ``_packed_gemm_kernel`` (M > ``GEMV_MAX_M``): tensor-core ``tl.dot`` on unpacked +-1/0 tiles in x's dtype
  (bf16 / fp16; fp32 with IEEE precision), or int8 x int8 -> int32 for int8 activations; grouped program order;
  a 16-row tile with split-K for skinny M (<= ``SKINNY_MAX_M`` = 16).
- Split-K partial sums go to a ``[SPLIT_K, P, M, N]`` workspace (int32 for int8 activations, so integer sums stay
  exact) and ``_splitk_reduce_kernel`` adds them in a fixed order and applies the epilogue: deterministic, no atomics.
- Epilogue, float32: ``y[m, n] = x_scale[m] * sum_p alpha[p, n] * acc_p[m, n] + bias[n]``, cast to the output dtype.
- ``_quantize_int8_kernel``: absmax int8 activations, ``s = max|x| / 127`` per token (or a given per-tensor ``s``),
  ``q = clamp(round_half_even(x / s), -127, 127)`` with IEEE division.

The Triton interpreter (``TRITON_INTERPRET=1``) has no bfloat16 arithmetic (triton-lang/triton#11584): every
kernel converts bf16 loads to float32 before arithmetic, and the GEMM unpacks to float32 for bf16 inputs there.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import configs
from ._common import INTERPRET, grouped_tile, launch, round_half_even

__all__ = ["GEMV_MAX_M", "SKINNY_MAX_M", "choose_kernel", "default_config", "packed_matmul", "quantize_int8"]

GEMV_MAX_M = 2
SKINNY_MAX_M = 16
WORD_BITS = 32
MAX_SPLIT_K = 16
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Integer sums up to 2^24 are exact in float32: the gemv accumulates int8 activations in float32 below this K.
FP32_EXACT_MAX_K = 2**24 // (2 * 128)


@triton.jit
def _quantize_int8_kernel(
    x_ptr, q_ptr, scale_ptr, K,
    stride_xm, stride_xk, stride_qm,
    PER_TOKEN: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """s = max_k |x[m, k]| / 127 (or the given per-tensor s); q = clamp(round_half_even(x / s), -127, 127)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    if PER_TOKEN:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        # Clamping first keeps |v| < 2**22 for the rounding and gives the same code.
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, safe), -127.0), 127.0)
        q = round_half_even(q)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(tl.int8), mask=mask)


def _i32(value: int) -> int:
    """A 32-bit pattern as the signed int32 Triton takes for a constant."""
    return value - (1 << 32) if value >= 1 << 31 else value


# Bit patterns of the codes: -1 in every 16-bit half (bf16, fp16) or the float32 word, and the sign bits.
_BF16_NEG_ONE2: tl.constexpr = tl.constexpr(_i32(0xBF80BF80))
_FP16_NEG_ONE2: tl.constexpr = tl.constexpr(_i32(0xBC00BC00))
_BF16_ONE2: tl.constexpr = tl.constexpr(0x3F80)
_FP16_ONE2: tl.constexpr = tl.constexpr(0x3C00)
_FP32_NEG_ONE: tl.constexpr = tl.constexpr(_i32(0xBF800000))
_FP32_ONE: tl.constexpr = tl.constexpr(0x3F800000)
_SIGN: tl.constexpr = tl.constexpr(_i32(0x80000000))
_SIGN2: tl.constexpr = tl.constexpr(_i32(0x80008000))


@triton.jit
def _halves(pairs, DTYPE: tl.constexpr):
    """int32 [..., L] of two 16-bit codes each -> DTYPE [..., 2, L]: the low halves, then the high halves."""
    low = pairs.to(tl.int16).to(DTYPE, bitcast=True)
    high = (pairs >> 16).to(tl.int16).to(DTYPE, bitcast=True)
    both = tl.join(low, high)  # [..., L, 2]
    return tl.permute(both, (0, 1, 3, 2))


@triton.jit
def _bytes(quads):
    """int32 [..., L] of four int8 codes each -> int8 [..., 4, L], byte 0 first."""
    b0 = quads.to(tl.int8)
    b1 = (quads >> 8).to(tl.int8)
    b2 = (quads >> 16).to(tl.int8)
    b3 = (quads >> 24).to(tl.int8)
    both = tl.join(tl.join(b0, b1), tl.join(b2, b3))  # [..., L, 2, 2]: byte 2 q + p at [..., p, q]
    return tl.reshape(tl.permute(both, (0, 1, 4, 3, 2)), [both.shape[0], both.shape[1], 4, both.shape[2]])


@triton.jit
def _unpack_tile(words, BITS: tl.constexpr, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words [BN, BK / (32 / BITS)] -> codes [BN, BK] in DTYPE, built as bit patterns on whole 32-bit words.

    A 16-bit dtype takes two codes per word operation: fields f and f + PER_WORD / 2 land in the sign bits of the
    two halves (binary: -1 with the sign flipped by the bit; ternary: the magnitude of 1 where exactly one of the
    field's bits is set, the sign from its high bit). int8 takes four per word (fields f + PER_WORD / 4 * i in byte
    i), float32 one. Field 3 (never written) decodes to 0, as ``bitpack.unpack_codes``.
    """
    PER_WORD: tl.constexpr = 32 // BITS
    w = words[:, :, None]
    if DTYPE == tl.int8:
        LANES: tl.constexpr = PER_WORD // 4
        t = w >> (tl.arange(0, LANES) * BITS)[None, None, :]  # field f + LANES * i at bits 8 i (+1) of byte i
        if BITS == 1:
            # bit 1 -> 0x01, bit 0 -> 0xFF: 0x01 + 0xFE * (1 - bit), no carry between bytes
            quads = (~t & 0x01010101) * 0xFE + 0x01010101
        else:
            plus = t & ~(t >> 1) & 0x01010101
            minus = (t >> 1) & ~t & 0x01010101
            quads = plus | (minus * 0xFF)
        codes = _bytes(quads)  # [BN, BKW, 4, LANES]
    elif DTYPE == tl.float32:
        lanes = tl.arange(0, PER_WORD)[None, None, :]
        if BITS == 1:
            bits = ((w << (31 - lanes)) & _SIGN) ^ _FP32_NEG_ONE
        else:
            t = w >> (2 * lanes)
            bits = (((t ^ (t >> 1)) & 1) * _FP32_ONE) | ((t << 30) & _SIGN)
        codes = bits.to(tl.float32, bitcast=True)  # [BN, BKW, PER_WORD]
    else:
        LANES: tl.constexpr = PER_WORD // 2
        lanes = tl.arange(0, LANES)[None, None, :]
        if BITS == 1:
            negative_one = _BF16_NEG_ONE2 if DTYPE == tl.bfloat16 else _FP16_NEG_ONE2
            pairs = ((w << (15 - lanes)) & _SIGN2) ^ negative_one
        else:
            t = w >> (2 * lanes)  # field f + LANES * h at bits 16 h (+1)
            one = _BF16_ONE2 if DTYPE == tl.bfloat16 else _FP16_ONE2
            pairs = (((t ^ (t >> 1)) & 0x10001) * one) | ((t << 14) & _SIGN2)
        codes = _halves(pairs, DTYPE)  # [BN, BKW, 2, LANES]
    return tl.reshape(codes, [BLOCK_N, BLOCK_K])


# The ternary GEMV's float decode (see _packed_gemv_kernel): fields 0 .. _LOW_FIELDS - 1 of a word sit in float32's
# 23 mantissa bits as they are, the rest after a shift by _LOW_BITS.
_LOW_FIELDS: tl.constexpr = tl.constexpr(11)
_LOW_BITS: tl.constexpr = tl.constexpr(22)
_ODD_BITS: tl.constexpr = tl.constexpr(_i32(0xAAAAAAAA))
_MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # the bits of 2^23, whose unit in the last place is 1
_MAGIC_VALUE: tl.constexpr = tl.constexpr(1 << 23)
_FIELD_MASK: tl.constexpr = tl.constexpr(3)
_ONE: tl.constexpr = tl.constexpr(1)


@triton.jit
def _offset_fields(words):
    """2-bit ternary fields (bit 0: +1, bit 1: -1, both: 0) -> fields c + 1 in {0, 1, 2}, on whole words.

    c + 1 has bit 1 where bit 0 is set and bit 1 is not, and bit 0 where the two bits are equal.
    """
    high = (words << 1) & ~words & _ODD_BITS
    low = ~(words ^ (words >> 1)) & 0x55555555
    return high | low


@triton.jit
def _field_code(magic_fields, SHIFT: tl.constexpr):
    """c * 2^SHIFT as float32 for the offset field c + 1 at bits SHIFT, SHIFT + 1 (SHIFT <= 20) of the word.

    ``magic_fields`` holds the offset fields ORed with the bits of 2^23: masked to that float's bits and the
    field's, it reads as 2^23 + (c + 1) * 2^SHIFT; subtracting 2^23 + 2^SHIFT leaves c * 2^SHIFT exactly.
    """
    value = (magic_fields & (_MAGIC | (_FIELD_MASK << SHIFT))).to(tl.float32, bitcast=True)
    return value - (_MAGIC_VALUE + (_ONE << SHIFT))


@triton.jit
def _ternary_fma(low, high, x, acc, LANE: tl.constexpr):
    """acc + c * x for the code c in field LANE of a word, from its offset fields ORed with 2^23's bits: ``low`` as
    they are, ``high`` shifted right by _LOW_BITS (the fields from _LOW_FIELDS on)."""
    if LANE < _LOW_FIELDS:
        magic_fields = low
        SHIFT: tl.constexpr = 2 * LANE
    else:
        magic_fields = high
        SHIFT: tl.constexpr = 2 * LANE - _LOW_BITS
    return tl.fma(_field_code(magic_fields, SHIFT), x * (0.5 ** SHIFT), acc)  # x * 2^-SHIFT: exact


@triton.jit
def _epilogue(
    y0, y1, offs_m, offs_n, M, N,
    scale_ptr, stride_sp, stride_sn, x_scale_ptr, stride_xs, bias_ptr,
    PARTS: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """y = x_scale[m] * sum_p alpha[p, n] * acc_p[m, n] + bias[n] in float32 (stride_sn = 0: one alpha per part)."""
    n_mask = offs_n < N
    alpha0 = tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
    y = y0.to(tl.float32) * alpha0[None, :]
    if PARTS == 2:
        alpha1 = tl.load(scale_ptr + stride_sp + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        y += y1.to(tl.float32) * alpha1[None, :]
    if HAS_X_SCALE:
        x_scale = tl.load(x_scale_ptr + offs_m * stride_xs, mask=offs_m < M, other=0.0).to(tl.float32)
        y = y * x_scale[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _store_result(
    y0, y1, offs_m, offs_n, pid_k, M, N, out_ptr,
    stride_os, stride_op, stride_om, stride_on,
    scale_ptr, stride_sp, stride_sn, x_scale_ptr, stride_xs, bias_ptr,
    PARTS: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
):
    """SPLIT: raw partial sums to workspace[pid_k, p]; else the epilogue to the output."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT:
        partial = out_ptr + pid_k * stride_os + offs
        tl.store(partial, y0, mask=mask)
        if PARTS == 2:
            tl.store(partial + stride_op, y1, mask=mask)
    else:
        y = _epilogue(
            y0, y1, offs_m, offs_n, M, N, scale_ptr, stride_sp, stride_sn, x_scale_ptr, stride_xs, bias_ptr,
            PARTS, HAS_X_SCALE, HAS_BIAS,
        )
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _packed_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr,
    M, N, K, KW, WORDS_PER_SPLIT,
    stride_xm, stride_xk, stride_wp, stride_wn, stride_sp, stride_sn, stride_xs,
    stride_os, stride_op, stride_om, stride_on, magic,
    BITS: tl.constexpr, PARTS: tl.constexpr, INT_ACC: tl.constexpr,
    HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    """acc_p[m, n] = sum_k x[m, k] * c_p[n, k] over this program's words.

    Binary: sum_k c x = 2 * sum_{bit set} x - sum_k x, a bit test and a predicated add per weight.

    Ternary, float32 sums: whole-word operations turn each word into the offset fields c + 1 in {0, 1, 2} and OR in
    ``magic``, the bits of 2^23. A field masked out of that word reads as the float 2^23 + (c + 1) * 2^s (s its
    bit offset; the fields past the mantissa after one shift of the word), subtracting 2^23 + 2^s leaves c * 2^s
    exactly, and an FMA with x * 2^-s adds c * x: a mask, a subtract and an FMA per weight. Scaling x by 2^-s is
    exact unless |x| < 2^-106 (x * 2^-s below float32's normal range). ``magic`` is a run-time argument, not a
    constant, so that the compiler keeps it ORed into whole words: a constant would fold into every field's mask
    and cost a register load per weight.

    Ternary, int32 sums: sum_{field bit 0} x - sum_{field bit 1} x, two bit tests and two predicated adds per
    weight. int8 x accumulates in float32 (exact below 2^24) unless INT_ACC.
    """
    PER_WORD: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m3 = offs_m[:, None, None]  # [BM, 1, 1]
    n3 = offs_n[None, :, None]  # [1, BN, 1]
    x_rows = x_ptr + m3 * stride_xm
    w_rows = w_ptr + n3 * stride_wn
    if INT_ACC:
        acc0 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_KW], tl.int32)
        x_sum = tl.zeros([BLOCK_M, 1, BLOCK_KW], tl.int32)
    else:
        acc0 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_KW], tl.float32)
        x_sum = tl.zeros([BLOCK_M, 1, BLOCK_KW], tl.float32)
    acc1 = acc0
    word_begin = pid_k * WORDS_PER_SPLIT
    word_end = tl.minimum(word_begin + WORDS_PER_SPLIT, KW)
    for w0 in range(word_begin, word_end, BLOCK_KW):
        j3 = w0 + tl.arange(0, BLOCK_KW)[None, None, :]  # [1, 1, BKW] word index along K
        w_mask = (n3 < N) | EVEN_N
        if not EVEN_K:
            w_mask = w_mask & (j3 < KW)
        words0 = tl.load(w_rows + j3, mask=w_mask, other=0)  # [1, BN, BKW]
        if PARTS == 2:
            words1 = tl.load(w_rows + stride_wp + j3, mask=w_mask, other=0)
        if BITS == 2 and not INT_ACC:
            fields0 = _offset_fields(words0)
            low0 = fields0 | magic
            high0 = (fields0 >> _LOW_BITS) | magic  # the fields from _LOW_FIELDS on, at bit 0
            if PARTS == 2:
                fields1 = _offset_fields(words1)
                low1 = fields1 | magic
                high1 = (fields1 >> _LOW_BITS) | magic
        for lane in tl.static_range(PER_WORD):
            k3 = j3 * PER_WORD + lane
            # Splits cover whole steps, so only the K padding needs masking: on x, which zeroes its terms.
            x_mask = (m3 < M) | EVEN_M
            if not EVEN_K:
                x_mask = x_mask & (k3 < K)
            xv = tl.load(x_rows + k3 * stride_xk, mask=x_mask, other=0).to(acc0.dtype)  # [BM, 1, BKW]
            if BITS == 1:
                x_sum += xv
                acc0 = tl.where(((words0 >> lane) & 1) != 0, acc0 + xv, acc0)
                if PARTS == 2:
                    acc1 = tl.where(((words1 >> lane) & 1) != 0, acc1 + xv, acc1)
            elif INT_ACC:
                acc0 = tl.where(((words0 >> (2 * lane)) & 1) != 0, acc0 + xv, acc0)
                acc0 = tl.where(((words0 >> (2 * lane + 1)) & 1) != 0, acc0 - xv, acc0)
                if PARTS == 2:
                    acc1 = tl.where(((words1 >> (2 * lane)) & 1) != 0, acc1 + xv, acc1)
                    acc1 = tl.where(((words1 >> (2 * lane + 1)) & 1) != 0, acc1 - xv, acc1)
            else:
                acc0 = _ternary_fma(low0, high0, xv, acc0, lane)
                if PARTS == 2:
                    acc1 = _ternary_fma(low1, high1, xv, acc1, lane)
    y0 = tl.sum(acc0, axis=2)  # [BM, BN]
    y1 = y0
    if PARTS == 2:
        y1 = tl.sum(acc1, axis=2)
    if BITS == 1:
        total = tl.sum(x_sum, axis=2)  # [BM, 1]
        y0 = 2 * y0 - total
        y1 = 2 * y1 - total
    _store_result(
        y0, y1, offs_m, offs_n, pid_k, M, N, out_ptr, stride_os, stride_op, stride_om, stride_on,
        scale_ptr, stride_sp, stride_sn, x_scale_ptr, stride_xs, bias_ptr, PARTS, HAS_X_SCALE, HAS_BIAS, SPLIT,
    )


@triton.jit
def _packed_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr,
    M, N, K, KW, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wp, stride_wn, stride_sp, stride_sn, stride_xs,
    stride_os, stride_op, stride_om, stride_on,
    BITS: tl.constexpr, PARTS: tl.constexpr, INT8_X: tl.constexpr, DOT_FP32: tl.constexpr, CODES_LEFT: tl.constexpr,
    HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc_p = x[BM, BK] @ c_p[BN, BK]^T on tensor cores, c_p unpacked from [BN, BK / (32 / BITS)] words.

    CODES_LEFT computes the transposed tile, acc_p^T = c_p @ x^T: the codes are then the left operand and reach the
    MMA from registers (sm_90 register-operand wgmma, which stays asynchronous) instead of through a shared-memory
    tile written and read back every step. mma.sync targets keep x on the left (``configs.packed_codes_left``).
    """
    PER_WORD: tl.constexpr = 32 // BITS
    BLOCK_KW: tl.constexpr = BLOCK_K // PER_WORD
    pid_k = tl.program_id(1)
    # Grouped order: GROUP_M row tiles share each column tile of words while it is in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_KW)
    if INT8_X:
        acc_dtype: tl.constexpr = tl.int32
        dot_dtype: tl.constexpr = tl.int8
    elif DOT_FP32:
        acc_dtype: tl.constexpr = tl.float32
        dot_dtype: tl.constexpr = tl.float32
    else:
        acc_dtype: tl.constexpr = tl.float32
        dot_dtype: tl.constexpr = x_ptr.dtype.element_ty
    if CODES_LEFT:
        acc0 = tl.zeros([BLOCK_N, BLOCK_M], acc_dtype)
    else:
        acc0 = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
    acc1 = acc0
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    n_mask = offs_n[:, None] < N
    for k0 in range(k_begin, k_end, BLOCK_K):
        j = k0 // PER_WORD + offs_j[None, :]  # [1, BKW]
        # Splits cover whole steps, so only the K padding needs masking: on x, which zeroes its terms.
        if CODES_LEFT:
            k = k0 + offs_k[:, None]  # [BK, 1]
            a = tl.load(x_ptr + offs_m[None, :] * stride_xm + k * stride_xk, mask=(offs_m[None, :] < M) & (k < K),
                        other=0).to(dot_dtype)  # x^T [BK, BM]
        else:
            k = k0 + offs_k[None, :]  # [1, BK]
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k * stride_xk, mask=(offs_m[:, None] < M) & (k < K),
                        other=0).to(dot_dtype)  # x [BM, BK]
        words0 = tl.load(w_rows + j, mask=n_mask & (j < KW), other=0)  # [BN, BKW]
        codes0 = _unpack_tile(words0, BITS, dot_dtype, BLOCK_N, BLOCK_K)  # [BN, BK]
        acc0 = _codes_dot(codes0, a, acc0, CODES_LEFT, DOT_FP32)
        if PARTS == 2:
            words1 = tl.load(w_rows + stride_wp + j, mask=n_mask & (j < KW), other=0)
            codes1 = _unpack_tile(words1, BITS, dot_dtype, BLOCK_N, BLOCK_K)
            acc1 = _codes_dot(codes1, a, acc1, CODES_LEFT, DOT_FP32)
    if CODES_LEFT:
        acc0 = tl.trans(acc0)
        acc1 = tl.trans(acc1)
    _store_result(
        acc0, acc1, offs_m, offs_n, pid_k, M, N, out_ptr, stride_os, stride_op, stride_om, stride_on,
        scale_ptr, stride_sp, stride_sn, x_scale_ptr, stride_xs, bias_ptr, PARTS, HAS_X_SCALE, HAS_BIAS, SPLIT,
    )


@triton.jit
def _codes_dot(codes, a, acc, CODES_LEFT: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + codes @ a (a = x^T) when CODES_LEFT, else acc + a @ codes^T (a = x); IEEE float32 for DOT_FP32."""
    if CODES_LEFT:
        left = codes
        right = a
    else:
        left = a
        right = tl.trans(codes)
    if DOT_FP32:
        return tl.dot(left, right, acc, input_precision="ieee")
    return tl.dot(left, right, acc)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr,
    M, N, SPLIT_K,
    stride_ws, stride_wp, stride_wm, stride_sp, stride_sn, stride_xs, stride_om, stride_on,
    PARTS: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """acc_p = sum_s workspace[s, p] in split order (exact for int32), then the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    partial = ws_ptr + offs_m[:, None] * stride_wm + offs_n[None, :]
    y0 = tl.load(partial, mask=mask, other=0)
    for s in range(1, SPLIT_K):
        y0 += tl.load(partial + s * stride_ws, mask=mask, other=0)
    y1 = y0
    if PARTS == 2:
        y1 = tl.load(partial + stride_wp, mask=mask, other=0)
        for s in range(1, SPLIT_K):
            y1 += tl.load(partial + s * stride_ws + stride_wp, mask=mask, other=0)
    y = _epilogue(
        y0, y1, offs_m, offs_n, M, N, scale_ptr, stride_sp, stride_sn, x_scale_ptr, stride_xs, bias_ptr,
        PARTS, HAS_X_SCALE, HAS_BIAS,
    )
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def _new_workspace(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Split-K partial sums; every element is written by the matmul before the reduction reads it."""
    return torch.empty(shape, device=device, dtype=dtype)


def _split_k(tiles: int, steps: int, num_sms: int) -> int:
    """Splits of the K loop so that tiles * splits reaches about two programs per SM (1 when tiles suffice)."""
    if tiles >= num_sms:
        return 1
    return max(1, min(math.ceil(2 * num_sms / tiles), steps, MAX_SPLIT_K))


def choose_kernel(M: int) -> str:
    """``"gemv"`` for ``M <= GEMV_MAX_M``, else ``"gemm"``."""
    return "gemv" if M <= GEMV_MAX_M else "gemm"


def default_config(
    M: int,
    N: int,
    K: int,
    bits: int,
    *,
    parts: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    kernel: str = "auto",
    target: configs.Target | None = None,
) -> dict:
    """Launch config (kernel, tile sizes, ``SPLIT_K``, warps, stages) for ``x [M, K] @ W [N, K]^T``.

    ``kernel="auto"`` picks the gemv for ``M <= GEMV_MAX_M``; ``"gemv"`` can be forced up to M = 16.
    ``target=None`` means the interpreter: small tiles, no split. Otherwise the GPU tables of ``configs``
    (``PACKED_GEMV``, ``packed_gemm(bucket, target)``), with ``SPLIT_K`` chosen so that the grid reaches about two
    programs per SM of ``target``.
    """
    if target is not None and not isinstance(target, configs.Target):
        raise TypeError(f"target must be a configs.Target or None, got {type(target).__name__}")
    kernel = choose_kernel(M) if kernel == "auto" else kernel
    if kernel == "gemv":
        block_m = triton.next_power_of_2(M)
        if block_m > SKINNY_MAX_M:
            raise ValueError(f"the gemv kernel takes M <= {SKINNY_MAX_M}, got M={M}")
        if target is None:
            return dict(kernel="gemv", BLOCK_M=block_m, SPLIT_K=1, **configs.as_plan(configs.PACKED_GEMV_INTERPRETER))
        config = dict(kernel="gemv", BLOCK_M=block_m, **configs.as_plan(configs.PACKED_GEMV[block_m]))
        config["BLOCK_N"] = max(16, config["BLOCK_N"] // parts)
        if parts == 2 and bits == 2 and block_m == 1:
            # Two ternary parts keep four decoded words per loaded pair: 32 words per step spilled 24-32 B on sm_80
            # (compile gate, full grid).
            config["BLOCK_KW"] //= 2
        words = math.ceil(K / (WORD_BITS // bits))
        # Small layers (BERT-base) offer fewer tiles x steps than SMs: shrink the tiles until they fill the GPU.
        while math.ceil(N / config["BLOCK_N"]) * math.ceil(words / config["BLOCK_KW"]) < target.num_sms:
            if config["BLOCK_N"] > 32:
                config["BLOCK_N"] //= 2
            elif config["BLOCK_KW"] > 4:
                config["BLOCK_KW"] //= 2
            else:
                break
        steps = math.ceil(words / config["BLOCK_KW"])
        return dict(config, SPLIT_K=_split_k(math.ceil(N / config["BLOCK_N"]), steps, target.num_sms))
    if kernel != "gemm":
        raise ValueError(f"kernel must be 'auto', 'gemv' or 'gemm', got {kernel!r}")
    if target is None:
        return dict(kernel="gemm", SPLIT_K=1, **configs.as_plan(configs.PACKED_GEMM_INTERPRETER))
    if dtype == torch.float32:
        bucket = "fp32"
    else:
        bucket = "skinny" if M <= SKINNY_MAX_M else "medium" if M <= 64 else "large"
    config = dict(kernel="gemm", **configs.as_plan(configs.packed_gemm(bucket, target)))
    tiles = math.ceil(M / config["BLOCK_M"]) * math.ceil(N / config["BLOCK_N"])
    steps = math.ceil(K / config["BLOCK_K"])
    return dict(config, SPLIT_K=_split_k(tiles, steps, target.num_sms))


def _check_config(config: dict, M: int, bits: int) -> None:
    per_word = WORD_BITS // bits
    if config["kernel"] == "gemv":
        if config["BLOCK_M"] < M:
            raise ValueError(f"config BLOCK_M={config['BLOCK_M']} is smaller than M={M} (the gemv holds all rows)")
    elif config["BLOCK_K"] % per_word:
        raise ValueError(f"config BLOCK_K={config['BLOCK_K']} must be a multiple of {per_word} for bits={bits}")
    if not isinstance(config["SPLIT_K"], int) or config["SPLIT_K"] < 1:
        raise ValueError(f"config SPLIT_K must be a positive int, got {config['SPLIT_K']!r}")


def _check_matmul_args(x, data, scale, bias, bits, in_features, x_scale):
    for name, tensor in (("x", x), ("data", data), ("scale", scale)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if x.dtype not in (*FLOAT_DTYPES, torch.int8):
        raise TypeError(f"x must be float32, bfloat16, float16 or int8, got dtype {x.dtype}")
    if data.dtype != torch.int32:
        raise TypeError(f"data must be int32 packed words, got dtype {data.dtype}")
    if not scale.is_floating_point():
        raise TypeError(f"scale must be a floating-point tensor, got dtype {scale.dtype}")
    if bits not in (1, 2):
        raise ValueError(f"bits must be 1 or 2, got {bits!r}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be 2-D [M, in_features={in_features}], got shape {tuple(x.shape)}")
    words = math.ceil(in_features / (WORD_BITS // bits))
    if data.dim() != 3 or data.shape[0] not in (1, 2) or data.shape[2] != words:
        raise ValueError(f"data must be [parts (1 or 2), N, {words}], got shape {tuple(data.shape)}")
    if data.stride(2) != 1:
        raise ValueError(f"data must be contiguous along its last dim, got strides {data.stride()}")
    parts, out_features = data.shape[0], data.shape[1]
    if scale.dim() != 2 or scale.shape[0] != parts or scale.shape[1] not in (1, out_features):
        raise ValueError(f"scale must be [{parts}, 1] or [{parts}, {out_features}], got shape {tuple(scale.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias))}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if x_scale is not None:
        if not isinstance(x_scale, torch.Tensor) or not x_scale.is_floating_point():
            raise TypeError(f"x_scale must be a floating-point tensor, got {getattr(x_scale, 'dtype', x_scale)}")
        if x_scale.numel() not in (1, x.shape[0]):
            raise ValueError(f"x_scale must have 1 or M={x.shape[0]} elements, got shape {tuple(x_scale.shape)}")
    elif x.dtype == torch.int8:
        raise ValueError("int8 x needs x_scale (the activation scale: one value, or one per row)")
    for name, tensor in (("data", data), ("scale", scale), ("bias", bias), ("x_scale", x_scale)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def packed_matmul(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    in_features: int,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    kernel: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """``y = x_scale * (x @ W^T) + bias`` with ``W = sum_p scale[p] * codes(data[p])`` unpacked in registers.

    Args:
        x: ``[M, K]`` float32 / bfloat16 / float16, or int8 (then ``x_scale`` is required).
        data: int32 ``[P, N, KW]`` packed codes (``triton_bq.bitpack`` format), ``P`` in {1, 2}.
        scale: float ``[P, N]`` or ``[P, 1]``.
        bias: optional float ``[N]``.
        bits: 1 (binary) or 2 (ternary).
        in_features: K.
        x_scale: optional float, one element or one per row of ``x``.
        out_dtype: default ``x.dtype`` for float ``x``, float32 for int8 ``x``.
        out: optional preallocated ``[M, N]`` output of ``out_dtype`` (any strides); every element is written.
        kernel: ``"auto"`` (gemv for M <= ``GEMV_MAX_M`` = 2, gemm otherwise), ``"gemv"`` or ``"gemm"``.
        config: a launch config as returned by ``default_config`` (tests and tuning); default: ``default_config``.
    """
    _check_matmul_args(x, data, scale, bias, bits, in_features, x_scale)
    if out_dtype is None:
        out_dtype = torch.float32 if x.dtype == torch.int8 else x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    M, K = x.shape
    parts, N, KW = data.shape
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=out_dtype)
    elif out.shape != (M, N) or out.dtype != out_dtype or out.device != x.device:
        raise ValueError(
            f"out must be a [{M}, {N}] {out_dtype} tensor on {x.device}, got {tuple(out.shape)} {out.dtype} on "
            f"{out.device}"
        )
    if M == 0 or N == 0:
        return out
    device_target = configs.target_of(x.device)
    if config is None:
        config = default_config(M, N, K, bits, parts=parts, dtype=x.dtype, kernel=kernel, target=device_target)
    _check_config(config, M, bits)
    int8_x = x.dtype == torch.int8
    per_word = WORD_BITS // bits
    # The K loop runs over words (gemv) or elements (gemm); each split covers whole steps of the loop.
    if config["kernel"] == "gemv":
        loop_length, step = KW, config["BLOCK_KW"]
        num_tiles = math.ceil(N / config["BLOCK_N"])
    else:
        loop_length, step = K, config["BLOCK_K"]
        num_tiles = math.ceil(M / config["BLOCK_M"]) * math.ceil(N / config["BLOCK_N"])
    steps = math.ceil(loop_length / step)
    per_split = math.ceil(steps / min(config["SPLIT_K"], steps)) * step
    split_k = math.ceil(loop_length / per_split)
    # Integer accumulators: int8 x on tensor cores, or in the gemv when float32 sums could lose integers.
    int_acc = int8_x and (config["kernel"] == "gemm" or K > FP32_EXACT_MAX_K)
    if split_k > 1:
        target = _new_workspace((split_k, parts, M, N), x.device, torch.int32 if int_acc else torch.float32)
        target_strides = target.stride()
    else:
        target = out
        target_strides = (0, 0, out.stride(0), out.stride(1))
    x_scale_arg = x_scale.reshape(-1) if x_scale is not None else scale
    stride_xs = 0 if x_scale is None or x_scale.numel() == 1 else x_scale_arg.stride(0)
    common = (
        x, data, scale, x_scale_arg, bias if bias is not None else scale, target,
        M, N, K, KW, per_split,
        x.stride(0), x.stride(1), data.stride(0), data.stride(1),
        scale.stride(0), scale.stride(1) if scale.shape[1] > 1 else 0, stride_xs,
        *target_strides,
    )
    flags = dict(BITS=bits, PARTS=parts, HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None, SPLIT=split_k > 1)
    grid = (num_tiles, split_k)
    if config["kernel"] == "gemv":
        # Mask-free loads where the shape allows it (the common LLM / BERT case) shorten the inner loop.
        even = dict(EVEN_M=M == config["BLOCK_M"], EVEN_N=N % config["BLOCK_N"] == 0,
                    EVEN_K=K == KW * per_word and KW % config["BLOCK_KW"] == 0)
        option = configs.from_plan(config, ("BLOCK_M", "BLOCK_N", "BLOCK_KW"))
        launch(_packed_gemv_kernel, grid, (option,), (*common, _MAGIC.value), dict(flags, **even, INT_ACC=int_acc))
    else:
        dot_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and INTERPRET)
        option = configs.from_plan(config, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
        codes_left = configs.packed_codes_left(device_target)
        launch(_packed_gemm_kernel, grid, (option,), common,
               dict(flags, INT8_X=int8_x, DOT_FP32=dot_fp32, CODES_LEFT=codes_left))
    if split_k > 1:
        block_m, block_n = min(triton.next_power_of_2(M), 16), 128
        launch(
            _splitk_reduce_kernel, (math.ceil(M / block_m), math.ceil(N / block_n)),
            (configs.config(4, 3, BLOCK_M=block_m, BLOCK_N=block_n),),
            (target, scale, x_scale_arg, bias if bias is not None else scale, out,
             M, N, split_k,
             target.stride(0), target.stride(1), target.stride(2),
             scale.stride(0), scale.stride(1) if scale.shape[1] > 1 else 0, stride_xs, out.stride(0), out.stride(1)),
            dict(PARTS=parts, HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None),
        )
    return out


def quantize_int8(x: torch.Tensor, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 quantization of ``x`` ``[M, K]``: ``(q int8 [M, K], scale float32 [M] or [])``.

    ``scale = max|x| / 127`` per row (``per_token``) or over the whole tensor; ``q = clamp(round_half_even(x /
    scale), -127, 127)`` (a zero scale divides by 1). ``x ~= q * scale``.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float32, bfloat16 or float16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    if per_token:
        scale = torch.empty((M,), device=x.device, dtype=torch.float32)
    else:
        scale = x.detach().abs().amax().float() / 127 if x.numel() else torch.zeros((), device=x.device)
    if x.numel() == 0:
        return q, scale.zero_()
    block_k = min(triton.next_power_of_2(K), 128 if configs.target_of(x.device) is None else 1024)
    launch(
        _quantize_int8_kernel, (M,), (configs.config(4, 3, BLOCK_K=block_k),),
        (x, q, scale, K, x.stride(0), x.stride(1), q.stride(0)), dict(PER_TOKEN=per_token),
    )
    return q, scale
