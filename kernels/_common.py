"""Shared launcher helpers: interpreter detection, device checks, output allocation, shared Triton math."""

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
    if not tensor.is_cuda and not INTERPRET:
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
def to_dtype(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, done on the float32 bits under the interpreter for bf16."""
    if _INTERPRETER_WORKAROUNDS and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
