"""Shared by every kernel file: the interpreter flag, device checks, output allocation, the one launch path and
the Triton helpers more than one kernel uses (round half to even, grouped tile order, dot, rounding casts)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once at import: triton reads the same variable, and conftest sets it before anything imports triton.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter keeps bf16 as raw uint16: it does no bf16 arithmetic (triton's debugging guide says to cast to
# float32 first), tl.dot multiplies the bit patterns (triton-lang/triton#11584) and float32 -> bf16 truncates.
# The kernels compare and compute in float32 everywhere; these two helpers cover the dot and the rounding.
_INTERPRETER_WORKAROUNDS = tl.constexpr(INTERPRET)

# Tests flip this to fill every output with NaN before a launch, so an element a kernel never writes shows up.
POISON_OUTPUTS = False

# The offline compile gate (``compile_gate``) installs a callable here: every launch is then handed to it instead of
# running, and CPU tensors are accepted, so the real launchers enumerate what they would compile on a GPU.
LAUNCH_RECORDER = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer the kernel overwrites completely (NaN, or the most negative int, with ``POISON_OUTPUTS``)."""
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_kernel_tensor(name: str, tensor: torch.Tensor, dtypes=SUPPORTED_DTYPES) -> None:
    """Kernel-specific checks the functional layer does not make: dtype support, device, 32-bit indexing."""
    if tensor.dtype not in dtypes:
        names = ", ".join(str(dtype) for dtype in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}) for the Triton kernels, got {tensor.dtype}")
    if not tensor.is_cuda and not INTERPRET and LAUNCH_RECORDER is None:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {name} on {tensor.device}"
        )
    if tensor.numel() >= 2**31:
        raise ValueError(f"{name} has {tensor.numel()} elements; the kernels use 32-bit offsets (< 2**31)")


@triton.jit
def round_half_even(v):
    """Round-to-nearest-even of float32 ``v`` with ``|v| < 2**22``: adding 1.5 * 2**23 leaves no fraction bits.

    The IEEE add rounds the fraction away (ties to even), the subtraction is exact. Works identically on CUDA
    and in the interpreter, where ``libdevice.rint`` is not available.
    """
    magic = 12582912.0
    return (v + magic) - magic


@triton.jit
def grouped_tile(pid, num_pid_rows, num_pid_cols, GROUP: tl.constexpr):
    """Map a linear program id to (row tile, col tile), GROUP row tiles per column sweep to reuse tiles in L2."""
    width = GROUP * num_pid_cols
    first_row = (pid // width) * GROUP
    group_rows = tl.minimum(num_pid_rows - first_row, GROUP)
    return first_row + (pid % width) % group_rows, (pid % width) // group_rows


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation (tensor cores for bf16 / fp16 / tf32 on CUDA).

    Under the interpreter the operands are widened to float32 first; every product of two bf16 or fp16 values is
    exact in float32, so the result is the same sum as the tensor-core one.
    """
    if _INTERPRETER_WORKAROUNDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def int_dot(a, b, acc):
    """acc + a @ b for int8 operands and an int32 accumulator (integer tensor cores on CUDA).

    Under the interpreter each step's product is taken in float32 (exact: one step of at most a few hundred 8-bit
    products stays far below 2**24) and added in int32.
    """
    if _INTERPRETER_WORKAROUNDS:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee").to(tl.int32)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, done on the float32 bits under the interpreter for bf16."""
    if _INTERPRETER_WORKAROUNDS and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def _autotuner(kernel, configs: tuple, key: tuple):
    """One autotuner per (kernel, config list, key): its cache of tuned configs lives as long as the process."""
    found = _AUTOTUNERS.get((kernel, configs, key))
    if found is None:
        found = _AUTOTUNERS[(kernel, configs, key)] = triton.autotune(configs=list(configs), key=list(key))(kernel)
    return found


_AUTOTUNERS = {}


def launch(kernel, grid, configs, args: tuple, constexprs: dict, autotune_key: tuple = ()) -> None:
    """Run ``kernel[grid](*args, **constexprs)`` with ``configs`` (a tuple of ``triton.Config``).

    One config runs directly with its meta-parameters and launch options; several are autotuned over
    ``autotune_key`` (argument names), the first being the default. ``LAUNCH_RECORDER``, when set, receives the
    launch instead (the compile gate).
    """
    if not configs:
        raise ValueError(f"no launch config for {kernel.__name__}")
    if LAUNCH_RECORDER is not None:
        LAUNCH_RECORDER(kernel, args, constexprs, configs)
        return
    if len(configs) == 1:
        kernel[grid](*args, **constexprs, **configs[0].all_kwargs())
    else:
        _autotuner(kernel, tuple(configs), tuple(autotune_key))[grid](*args, **constexprs)
