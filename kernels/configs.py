"""Launch configs of every kernel, chosen by target (compute capability and per-block shared memory).

One convention for all kernel files: a launch config is a ``triton.Config`` (meta-parameters in ``kwargs``,
``num_warps`` / ``num_stages`` as launch options) built by ``config``; a kernel gets a tuple of them from a function
of this module, given the ``Target`` of the tensors' device (``None``: the Triton interpreter, which has its own
small tiles). The first config of a tuple is the default (the only one with ``TRITON_BQ_AUTOTUNE=0``); the others
are autotuned. Every tuple is pruned for the target before autotuning, so a config that cannot fit the target's
shared memory is never compiled there.

``python -m triton_bq.kernels.compile_gate`` compiles these choices offline for each target (no GPU needed) and
checks shared memory and register spills; the measured figures are in ``docs/kernels.md``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton

from ._common import INTERPRET

__all__ = ["AUTOTUNE", "TARGETS", "Target", "config", "recording", "target_of"]

# TRITON_BQ_AUTOTUNE=0 runs the first config of each list without benchmarking (fast compiles for GPU tests).
AUTOTUNE = os.environ.get("TRITON_BQ_AUTOTUNE", "1") != "0"


@dataclass(frozen=True)
class Target:
    """What the config choice depends on: ``capability`` (major * 10 + minor), the per-block shared-memory opt-in
    maximum in bytes (what the loader checks a kernel against) and the SM count (split-K heuristics)."""

    name: str
    capability: int
    shared_memory: int
    num_sms: int


# The targets the compile gate proves; the SM counts are those of the usual part (A100, RTX 3090, RTX 4090, H100
# SXM, B200, RTX 5090) and only steer split-K in the packed inference kernels.
TARGETS = {
    target.name: target
    for target in (
        Target("sm_80", 80, 166912, 108),
        Target("sm_86", 86, 101376, 82),
        Target("sm_89", 89, 101376, 128),
        Target("sm_90", 90, 232448, 132),
        Target("sm_100", 100, 232448, 148),
        Target("sm_120", 120, 101376, 170),
    )
}

_RECORDING_TARGET: Target | None = None


@contextlib.contextmanager
def recording(target: Target):
    """Make ``target_of`` answer ``target`` for every device (the compile gate records launches on CPU tensors)."""
    global _RECORDING_TARGET
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {type(target).__name__}")
    saved, _RECORDING_TARGET = _RECORDING_TARGET, target
    try:
        yield target
    finally:
        _RECORDING_TARGET = saved


@functools.cache
def _cuda_target(index: int) -> Target:
    properties = torch.cuda.get_device_properties(index)
    capability = properties.major * 10 + properties.minor
    return Target(f"sm_{capability}", capability, properties.shared_memory_per_block_optin,
                  properties.multi_processor_count)


def target_of(device: torch.device) -> Target | None:
    """The ``Target`` of a CUDA device, or ``None`` under the interpreter (the interpreter configs apply)."""
    if _RECORDING_TARGET is not None:
        return _RECORDING_TARGET
    if INTERPRET or device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def config(num_warps: int, num_stages: int, **meta) -> triton.Config:
    """A launch config: the kernel's meta-parameters (``BLOCK_M=...``) and its warps and pipeline stages."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def first_or_all(configs: tuple) -> tuple:
    """All configs when autotuning, else the default (the first)."""
    return configs if AUTOTUNE else configs[:1]


# ---------------------------------------------------------------------------------------------------------------
# Fused quantized linear (kernels/linear.py). Tile sizes are named by problem dimension (x [M, K], w [N, K],
# y [M, N]) in all three GEMMs. The interpreter gets one small config, with which K=96 and N=33 still exercise the
# tail masks. float32 dots (IEEE or TF32) get smaller tiles.
LINEAR_KERNELS = ("fwd", "bwd_x", "bwd_w")
_LINEAR_INTERPRETER = (config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP=2),)


def _gemm(block_m, block_n, block_k, warps, stages, group=8):
    return config(warps, stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=group)


# Candidates in order of preference; ``linear`` keeps those that fit the target (``linear_shared_bound``) and puts
# the spill-free ones first, so the default is the first survivor. The 227 KB parts (sm_90, sm_100) keep the big
# tiles; the 163 KB sm_80 and the 99 KB parts (sm_86, sm_89, sm_120) fall through to the smaller ones. The last
# entry of each list fits every target for every operand dtype.
_LINEAR = {
    # y^T tile [BLOCK_N, BLOCK_M] = codes [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M]
    "fwd": (_gemm(128, 128, 64, 8, 3), _gemm(64, 128, 64, 4, 4), _gemm(128, 128, 128, 8, 3), _gemm(256, 128, 64, 8, 3),
            _gemm(128, 128, 32, 8, 3), _gemm(64, 128, 32, 8, 3), _gemm(64, 128, 32, 4, 3), _gemm(128, 64, 32, 4, 2)),
    # grad_x^T tile [BLOCK_K, BLOCK_M] = codes^T [BLOCK_K, BLOCK_N] @ grad_y^T [BLOCK_N, BLOCK_M]
    "bwd_x": (_gemm(128, 64, 128, 8, 3), _gemm(64, 64, 128, 4, 4), _gemm(128, 64, 64, 4, 4), _gemm(256, 64, 128, 8, 3),
              _gemm(64, 64, 128, 8, 3), _gemm(64, 32, 128, 4, 3), _gemm(64, 32, 64, 8, 2), _gemm(64, 32, 64, 4, 2)),
    # grad_w^T tile [BLOCK_K, BLOCK_N] = q^T [BLOCK_K, BLOCK_M] @ grad_y [BLOCK_M, BLOCK_N]
    "bwd_w": (_gemm(64, 128, 128, 8, 3), _gemm(64, 64, 128, 4, 4), _gemm(64, 256, 128, 8, 3), _gemm(64, 128, 64, 4, 4),
              _gemm(32, 128, 128, 8, 3), _gemm(32, 64, 128, 4, 3), _gemm(32, 64, 64, 4, 2)),
}
# IEEE float32 dots run on FMA; with 4 warps ptxas spills the grad GEMMs on sm_80 / sm_89 and a 32-wide grad-x
# reduction step spills on sm_90 (compile gate), so their defaults take 8 warps and grad-x steps by 16.
_LINEAR_FP32 = {
    "fwd": (_gemm(64, 64, 32, 4, 3), _gemm(128, 64, 32, 4, 3), _gemm(64, 64, 32, 4, 2), _gemm(64, 64, 32, 8, 3),
            _gemm(64, 64, 32, 8, 2)),
    "bwd_x": (_gemm(64, 16, 64, 8, 3), _gemm(64, 32, 64, 4, 3), _gemm(128, 32, 64, 4, 3), _gemm(64, 32, 64, 8, 2),
              _gemm(64, 32, 64, 4, 2)),
    "bwd_w": (_gemm(32, 64, 64, 8, 3), _gemm(32, 64, 64, 4, 3), _gemm(32, 128, 64, 4, 3), _gemm(32, 64, 64, 4, 2)),
}


@dataclass(frozen=True)
class LinearOperands:
    """What the shared memory and register use of a fused-linear GEMM depends on besides its config."""

    x_bytes: int  # element size of the x operand as loaded (x, or the codes buffer in the dot dtype)
    weight_bytes: int  # element size of the latent weight
    dot_bytes: int  # element size of the dot dtype (2, or 4 for float32 dots)
    act_fused: bool  # activation codes computed from x in the main loop
    partials: bool  # grad_x also reduces clip / LSQ-step partial sums in its epilogue
    weight_fused: bool = True  # weight codes computed from the latent weight in the main loop (else streamed)
    tf32: bool = False  # float32 dots on TF32 tensor cores (else IEEE on FMA units); only with dot_bytes 4
    # The forward loop also sums the weight codes per output feature (asymmetric activations with the weight codes
    # made in the loop, or an unquantized weight): the zero-point term of the epilogue.
    code_sum: bool = False


def linear_shared_bound(kernel: str, option: triton.Config, operands: LinearOperands) -> int:
    """An upper bound of the shared memory (bytes) of one GEMM config.

    Every pipeline stage holds the raw tiles of the two main-loop loads, and an operand quantized or converted in
    registers takes one more tile in the dot dtype (Triton stages it through shared memory for the MMA). The
    compile gate checks the bound against what Triton allocates.
    """
    meta = option.kwargs
    block_m, block_n, block_k = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    dot = operands.dot_bytes
    if kernel == "fwd":  # codes [BN, BK] from w, x^T [BK, BM]
        raw = block_n * block_k * operands.weight_bytes + block_k * block_m * operands.x_bytes
        converted = block_n * block_k * dot if operands.weight_fused or operands.weight_bytes != dot else 0
        converted += block_k * block_m * dot if operands.act_fused or operands.x_bytes != dot else 0
    elif kernel == "bwd_x":  # codes^T [BK, BN] from w, grad_y^T [BN, BM] in the dot dtype
        raw = block_k * block_n * operands.weight_bytes + block_n * block_m * dot
        converted = block_k * block_n * dot if operands.weight_fused or operands.weight_bytes != dot else 0
    else:  # q^T [BK, BM] from x, grad_y [BM, BN] in the dot dtype
        raw = block_k * block_m * operands.x_bytes + block_m * block_n * dot
        converted = block_k * block_m * dot if operands.act_fused or operands.x_bytes != dot else 0
    return option.num_stages * raw + converted


def _spill_prone(kernel: str, option: triton.Config, operands: LinearOperands, target: Target) -> bool:
    """Configs whose per-thread live tiles exceed the registers with this operand mix (thresholds from the compile
    gate): grad_x with partial sums holds the accumulator, the x tile and the masks of a [BK, BM] tile at once; the
    fused tensor-core forward on sm_8x (no register-operand wgmma) keeps the float32 x tile, its codes and the
    weight codes live besides the accumulator (the IEEE fp32 forward with both operands fused is clean with 4 warps
    there, and 8 warps spilled on sm_89); the fused grad_w on sm_120 (mma.sync, the
    accumulator in registers, and a ptxas that caps the registers of big 8-warp tiles) keeps the q^T tile, grad_y
    and the accumulator live at once; the forwards that also sum the weight codes for an asymmetric activation's
    zero point (sm_90 with float32 x, sm_100, and one float32 case on sm_80); and float32 cases where
    ptxas-blackwell's allocator stopped short of the registers the tile needed (sm_100, sm_120)."""
    meta = option.kwargs
    threads = 32 * option.num_warps
    if kernel == "bwd_x" and operands.partials:
        return meta["BLOCK_K"] * meta["BLOCK_M"] // threads > 16
    if kernel == "fwd" and operands.dot_bytes == 4 and operands.act_fused and not operands.weight_fused:
        # IEEE float32 (FMA) forward quantizing x in the loop beside streamed weight codes: 4 warps spilled
        # 0.5-4.4 KB on sm_80 / 89 / 90 (compile gate), with 2 or 3 stages; 8 warps with 2 stages spilled 8 B
        # on sm_89 (float weights, A8 asym; full grid), with 3 stages none.
        return option.num_warps < 8
    if (kernel == "fwd" and operands.tf32 and operands.act_fused and operands.weight_fused
            and 80 <= target.capability < 90):
        # TF32 forward quantizing both operands in the loop on sm_8x: 64x64x32 with 4 warps spilled 4-8 B in 5
        # of 28 specializations on sm_89 (full grid, every config), 8 warps with 2 stages in 2, 128x64x32 in 1
        # (per token); 8 warps with 3 stages in none. (The IEEE ones are clean with the 4-warp default.)
        return (meta["BLOCK_M"], meta["BLOCK_N"], option.num_warps, option.num_stages) != (64, 64, 8, 3)
    if kernel == "fwd" and operands.code_sum:
        if (operands.dot_bytes == 2 and 90 <= target.capability < 120
                and (target.capability >= 100 or (operands.act_fused and operands.x_bytes == 4))):
            # The zero-point code sum beside a 64-deep K step at 128x128 / 8 warps: at 255 registers on sm_90 with
            # float32 x quantized in the loop (24-68 B with per-token scales), and on sm_100 in 26 of 135
            # asymmetric forwards (ptxas-blackwell; 25 per token); 128x128x32 / 8 warps / 3 stages spilled in
            # none of them on either target (full grid, every config).
            return meta["BLOCK_K"] > 32
        if operands.tf32 and 100 <= target.capability < 120:
            # TF32 on sm_100: ptxas-blackwell held 64x64x32 / 4 warps at 80-96 registers and spilled 16-36 B in
            # 6 of 30 asymmetric forwards; 8 warps spilled in none (full grid, every config).
            return option.num_warps < 8
        if (target.capability == 80 and operands.dot_bytes == 4 and not operands.tf32 and operands.weight_fused
                and not operands.act_fused):
            # IEEE float32 forward making the weight codes in the loop beside streamed asymmetric activation
            # codes: 3 stages of 64x64x32 / 4 warps spilled 48 B at 128 registers on sm_80 (BWN per row, A8
            # asym per token); 2 stages spilled in none of 30 asymmetric float32 forwards (full grid, every
            # config). sm_86 / sm_89 compiled the 3-stage default clean.
            return option.num_stages > 2
    if kernel == "fwd" and operands.act_fused and operands.dot_bytes == 2 and target.capability < 90:
        return meta["BLOCK_K"] * (meta["BLOCK_M"] + meta["BLOCK_N"]) // threads > 24
    if kernel == "bwd_w" and operands.act_fused and operands.dot_bytes == 4 and target.capability >= 100:
        # IEEE float32 grad_w: ptxas-blackwell held the 8-warp 32x64x64 tile at 80 registers and spilled 4-8 B
        # with per-token activations and the clipped STE (sm_100, sm_120); 4 warps took 107 registers on sm_120,
        # clean (full grid).
        return option.num_warps > 4
    if kernel == "bwd_w" and operands.act_fused and target.capability >= 120:
        block_m, block_n, block_k = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        return (block_k * block_m + block_m * block_n + block_k * block_n) // threads > 64
    if (kernel == "fwd" and operands.dot_bytes == 4 and operands.weight_fused and not operands.act_fused
            and target.capability >= 120):
        # float32 forward making the weight codes in the loop from streamed activation codes: 3 stages of the
        # 64x64x32 / 4-warp tile spilled 24 B at 128 registers on sm_120 (TF32, TWN per row, A8 asym per token;
        # full grid); 2 stages took 130, clean.
        return option.num_stages > 2
    return False


def linear(kernel: str, target: Target | None, operands: LinearOperands) -> tuple:
    """Configs of one fused-linear GEMM (``"fwd"``, ``"bwd_x"`` or ``"bwd_w"``) on ``target``: the candidates that
    fit its shared memory, spill-free ones first; the first is the default."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"kernel must be one of {LINEAR_KERNELS}, got {kernel!r}")
    if target is None:
        return _LINEAR_INTERPRETER
    table = _LINEAR_FP32 if operands.dot_bytes == 4 else _LINEAR
    return first_or_all(_fitting(kernel, table[kernel], target, operands))


@functools.cache
def _fitting(kernel: str, candidates: tuple, target: Target, operands: LinearOperands) -> tuple:
    fits = [option for option in candidates if linear_shared_bound(kernel, option, operands) <= target.shared_memory]
    if not fits:
        raise RuntimeError(f"no {kernel} config fits the {target.shared_memory} B of shared memory of {target.name}")
    calm = [option for option in fits if not _spill_prone(kernel, option, operands, target)]
    return tuple(calm + [option for option in fits if option not in calm])


def linear_slots() -> tuple[int, int]:
    """(SLOT_M, SLOT_K) of the grad-x partial sums: a grid that every grad-x config of every target tiles exactly,
    so whichever config runs (autotune benchmarking included) rewrites the whole buffer."""
    tables = [_LINEAR_INTERPRETER] if INTERPRET else [_LINEAR["bwd_x"], _LINEAR_FP32["bwd_x"]]
    every = [option for table in tables for option in table]
    return min(option.kwargs["BLOCK_M"] for option in every), min(option.kwargs["BLOCK_K"] for option in every)


# The elementwise activation-codes pass ("codes" path).
# Kernels without a tuned list launch with Triton's defaults (4 warps, 3 stages).
def act_codes(target: Target | None) -> tuple:
    if target is None:
        return (config(4, 3, BLOCK_M=16, BLOCK_K=64),)
    # ptxas-blackwell (sm_100) spilled the LSQ codes of a 32-row tile (compile gate); half the rows per program.
    if target.capability == 100:
        return (config(4, 3, BLOCK_M=16, BLOCK_K=128),)
    return (config(4, 3, BLOCK_M=32, BLOCK_K=128),)


# The elementwise weight-codes pass ("codes" weight path).
def weight_codes(target: Target | None) -> tuple:
    if target is None:
        return (config(4, 3, BLOCK_N=16, BLOCK_K=64),)
    return (config(4, 3, BLOCK_N=32, BLOCK_K=128),)


# ---------------------------------------------------------------------------------------------------------------
# Scale reductions (kernels/scales.py): rows per program and columns per iteration of the row reductions, the
# activation min/max tiles and the one-program final reduction; the interpreter's tiles keep tests fast.
def scales(kernel: str, target: Target | None) -> tuple:
    """Configs of a scale kernel: ``"row"`` (row |w| sums), ``"act"`` (activation min/max), ``"final"``."""
    interpret = target is None
    if kernel == "row":
        return (config(4, 3, BLOCK_N=8, BLOCK_K=64 if interpret else 512),)
    if kernel == "act":
        return (config(4, 3, BLOCK_M=16, BLOCK_K=64) if interpret else config(4, 3, BLOCK_M=8, BLOCK_K=512),)
    if kernel == "final":
        return (config(4, 3, BLOCK=256 if interpret else 1024),)
    raise ValueError(f"kernel must be 'row', 'act' or 'final', got {kernel!r}")


# ---------------------------------------------------------------------------------------------------------------
# Packed inference (kernels/packed_matmul.py). The gemv by BLOCK_M (next power of two of M; above 2 only when the
# gemv is forced; one table fits every target), the gemm by M bucket, chosen for the target by ``packed_gemm``;
# ``packed_matmul.default_config`` adapts BLOCK_N / BLOCK_KW / SPLIT_K to the shape and the target's SM count.
# The interpreter uses a few large tiles (fast).
PACKED_GEMV = {
    1: config(4, 3, BLOCK_N=128, BLOCK_KW=32),
    # 16 words per step: 32 spilled up to 436 B on sm_80 (two parts) and a few bytes on sm_90 / sm_120 (compile
    # gate, full grid).
    2: config(4, 3, BLOCK_N=64, BLOCK_KW=16),
    4: config(4, 3, BLOCK_N=64, BLOCK_KW=16),
    8: config(4, 3, BLOCK_N=32, BLOCK_KW=16),
    16: config(4, 3, BLOCK_N=16, BLOCK_KW=16),
}
PACKED_GEMM = {
    "skinny": config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1),
    "medium": config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    "large": config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    # float32 inputs take IEEE fp32 dots (no tensor cores): small tiles keep the accumulators in registers (a
    # 64-wide N tile spilled 40-516 B with two parts on every target but sm_80).
    "fp32": config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
}
# The mma.sync targets (sm_8x, sm_120) hold the unpacked codes, the x fragments and the accumulator in the same
# registers (no register-operand wgmma): the 64x128 tile takes 8 warps there (4 spilled 4-28 B with two parts or
# two bits on sm_80 / 86 / 89 / 120), and ptxas-blackwell's sm_120 tiles step half as deep in K (the 64-deep large
# tile spilled 16 B with two 2-bit parts, the 256-deep skinny tile 12-16 B).
_PACKED_GEMM_MMA_SYNC = {"medium": config(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)}
_PACKED_GEMM_SM120 = {
    "skinny": config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
    "large": config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
}
PACKED_GEMM_BUCKETS = tuple(PACKED_GEMM)


def packed_gemm(bucket: str, target: Target) -> triton.Config:
    """The packed GEMM's config for an M ``bucket`` (``"skinny"``, ``"medium"``, ``"large"``, ``"fp32"``) on
    ``target``: the sm_90 / sm_100 table, with the mma.sync and sm_120 changes above."""
    if bucket not in PACKED_GEMM:
        raise ValueError(f"bucket must be one of {PACKED_GEMM_BUCKETS}, got {bucket!r}")
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {type(target).__name__}")
    if target.capability >= 120 and bucket in _PACKED_GEMM_SM120:
        return _PACKED_GEMM_SM120[bucket]
    if not _register_operand_wgmma(target) and bucket in _PACKED_GEMM_MMA_SYNC:
        return _PACKED_GEMM_MMA_SYNC[bucket]
    return PACKED_GEMM[bucket]


PACKED_GEMV_INTERPRETER = config(4, 1, BLOCK_N=64, BLOCK_KW=8)
PACKED_GEMM_INTERPRETER = config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2)


def _register_operand_wgmma(target: Target) -> bool:
    """sm_90 / sm_100: wgmma (tcgen05) takes its left operand from registers; the other targets use mma.sync."""
    return target.capability in (90, 100)


def packed_codes_left(target: Target | None) -> bool:
    """Whether the packed GEMM computes the transposed tile with the unpacked codes as the left MMA operand: on
    sm_90 / sm_100 and in the interpreter. Register-operand wgmma keeps the codes out of shared memory and the MMA
    asynchronous; on the mma.sync targets (sm_8x, sm_120) the transposed tile spilled with two parts (compile gate),
    and the codes reach mma.sync from registers either way."""
    return target is None or _register_operand_wgmma(target)


def as_plan(option: triton.Config) -> dict:
    """A config as the flat dict ``packed_matmul`` takes (``BLOCK_*=...``, ``num_warps``, ``num_stages``)."""
    return dict(option.kwargs, num_warps=option.num_warps, num_stages=option.num_stages)


def from_plan(plan: dict, meta: tuple) -> triton.Config:
    """The ``triton.Config`` of a ``packed_matmul`` plan dict: the keys named in ``meta`` and its launch options."""
    return config(plan["num_warps"], plan["num_stages"], **{name: plan[name] for name in meta})
