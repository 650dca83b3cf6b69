"""Fused Triton quantized linear (forward and straight-through backward) against ``triton_bq.reference``.

Runs on CUDA when present, else in Triton's CPU interpreter (conftest sets ``TRITON_INTERPRET=1``).
Every kernel output starts NaN-filled (``poison_outputs``), so an element a kernel never writes fails a test.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import pytest
import torch
from torch import nn
from triton_bq.kernels import _common
from triton_bq.kernels import linear as kernels_linear
from triton_bq.kernels.linear import fused_quant_linear

import triton_bq
from triton_bq import ops
from triton_bq import reference as ref
from triton_bq.options import QuantOptions


class Tolerance(NamedTuple):
    relative: float  # max |actual - expected| <= relative * max |expected|
    sqnr_db: float  # 10 log10(sum expected^2 / sum (actual - expected)^2) >= sqnr_db


# The one tolerance table, by compute dtype. float32 is IEEE on CUDA (torch's default "highest" precision)
# and exact numpy float32 in the interpreter; bf16 / fp16 differ from the float64 reference by output rounding.
TOLERANCES = {
    torch.float32: Tolerance(1e-4, 70.0),
    torch.bfloat16: Tolerance(1.5e-2, 35.0),
    torch.float16: Tolerance(2e-3, 50.0),
}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    tolerance = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (an unwritten element?)"
    error = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert error <= tolerance.relative * scale, (
        f"{name}: max |error| {error:.3e} > {tolerance.relative} * max |expected| {scale:.3e}"
    )
    noise = ((a - e) ** 2).sum().item()
    if noise > 0:
        sqnr = 10 * math.log10((e**2).sum().item() / noise)
        assert sqnr >= tolerance.sqnr_db, f"{name}: SQNR {sqnr:.1f} dB < {tolerance.sqnr_db} dB"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


class Shape(NamedTuple):
    batch: tuple  # leading dims of x
    k: int
    n: int


SHAPES = {
    "m1-k96-n33": Shape((1,), 96, 33),
    "m7-k64-n48": Shape((7,), 64, 48),
    "m127-k96-n33": Shape((127,), 96, 33),
    "b2-t5-k96-n40": Shape((2, 5), 96, 40),
    "m40-k130-n1": Shape((40,), 130, 1),
}


class Act(NamedTuple):
    method: str | None
    bits: int = 8
    signed: bool = True


ACTS = {
    "a-none": Act(None),
    "a8-sym": Act("sym", 8),
    "a8-asym": Act("asym", 8),
    "a4-lsq-signed": Act("lsq", 4, True),
    "a4-lsq-unsigned": Act("lsq", 4, False),
    "a4-asym-lsq": Act("asym_lsq", 4),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(shape: Shape, act: Act, dtype, device, seed=0):
    """x, latent weight (some |w| > 1 for the clipped STE), bias, clip pair, LSQ step; all leaf tensors."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape.batch, shape.k, generator=generator) * 2
    if act.method == "lsq" and not act.signed:
        x = x.relu()
    weight = torch.randn(shape.n, shape.k, generator=generator) * 0.8
    bias = torch.randn(shape.n, generator=generator)
    clip = torch.tensor([-2.5, 2.0])
    step = torch.tensor(0.7 if act.method == "asym_lsq" else 0.45 if act.signed else 0.3)
    return x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype), clip.to(device), step.to(device)


def run_op(op, x, weight, bias, clip, step, grad_y, **options):
    """Forward and backward; returns (y, grad_x, grad_w, grad_bias, grad_clip, grad_step)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, clip, step)]
    x, weight, bias, clip, step = leaves
    y = call(op, x, weight, bias, act_clip=clip, act_step=step, **options)
    y.backward(grad_y.to(y.dtype))
    return (y, x.grad, weight.grad, bias.grad, clip.grad, step.grad)


QUANT_FIELDS = ("weight_method", "granularity", "ste", "act_method", "act_bits", "act_signed")


def call(op, x, weight, bias, **arguments):
    """``op(x, weight, bias, QuantOptions(...), **tensors)`` from one flat dict of options and tensors."""
    fields = {name: arguments.pop(name) for name in QUANT_FIELDS if name in arguments}
    if fields.get("act_method") is None:
        fields.pop("act_bits", None)
    return op(x, weight, bias, QuantOptions(**fields), **arguments)


def options_for(weight_method, granularity, ste, act: Act, **given):
    return dict(
        weight_method=weight_method, granularity=granularity, ste=ste,
        weight_scale=given.get("weight_scale"), weight_threshold=given.get("weight_threshold"),
        act_method=act.method, act_bits=act.bits, act_signed=act.signed,
    )


# A scalar gradient (the clip pair, the LSQ step) is a sum of n terms t_i. Rounding each term and the partial sums
# at the compute dtype's eps gives an error of about sqrt(n) * eps * RMS(t) = eps * ||t||_2 (random-walk
# accumulation); measured at most 2.9 eps ||t||_2 (fp32) and 0.4 eps ||t||_2 (bf16, whose dominant error, the
# rounding of alpha and grad_y, is shared by the reference). The sum also has to be right relative to its own value
# (a bound on ||t|| alone can exceed |sum t| when the terms cancel, and then passes a wrong sign): measured at most
# 6.2e-6 (fp32) and 2.1% (bf16) of |expected|.
SCALAR_GRAD_EPS_FACTOR = 8.0
SCALAR_GRAD_RELATIVE = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.02}


def act_grad_terms(x, weight, clip, step, grad_y, options) -> list[torch.Tensor]:
    """The float64 terms of each element of the clip / LSQ-step gradient (one tensor per element)."""
    method, act_method = options["weight_method"], options["act_method"]
    w = weight.detach().double()
    if method is not None:
        w = ref.quantize_weight(
            w, method, options["granularity"], scale=options["weight_scale"], threshold=options["weight_threshold"]
        )
    g = grad_y.double().reshape(-1, w.shape[0]) @ w  # grad of x_hat
    xf = x.detach().double().reshape(g.shape)
    if act_method == "lsq":
        qmin, qmax = ref.act_qrange("lsq", options["act_bits"], options["act_signed"])
        v = xf / step.double()
        local = torch.where(v <= qmin, qmin, torch.where(v >= qmax, qmax, torch.round(v) - v))
        return [(g * local).reshape(-1) / math.sqrt(xf.numel() * qmax)]
    if act_method == "asym_lsq":
        qmin, qmax = ref.act_qrange("asym_lsq", options["act_bits"])
        v = (xf - xf.min()) / step.double()
        local = torch.where(v < qmin, qmin, torch.where(v > qmax, qmax, torch.round(v) - v))
        return [(g * local).reshape(-1) / math.sqrt(xf.numel() * qmax)]
    lo, hi = clip.double()
    return [g[xf <= lo], g[xf >= hi]]


def assert_scalar_grad_matches(name, actual, expected, terms, dtype) -> None:
    """Each element within ``8 eps ||terms||_2`` and within a fraction of its expected value, with its sign."""
    eps = torch.finfo(dtype).eps
    assert actual.shape == expected.shape and bool(torch.isfinite(actual).all()), f"{name}: {actual}"
    for index, (got, wanted, summed) in enumerate(
        zip(actual.double().reshape(-1).tolist(), expected.double().reshape(-1).tolist(), terms, strict=True)
    ):
        error, noise = abs(got - wanted), SCALAR_GRAD_EPS_FACTOR * eps * summed.norm().item()
        assert error <= noise, f"{name}[{index}]: |error| {error:.3e} > 8 eps ||terms|| = {noise:.3e}"
        assert error <= SCALAR_GRAD_RELATIVE[dtype] * abs(wanted), (
            f"{name}[{index}]: |error| {error:.3e} > {SCALAR_GRAD_RELATIVE[dtype]} * |expected {wanted:.6g}|"
        )
        assert (got > 0) == (wanted > 0) and (got < 0) == (wanted < 0), f"{name}[{index}]: {got} vs {wanted}"


def check_against_float64_reference(x, weight, bias, clip, step, options, dtype):
    torch.manual_seed(7)
    # Both sides get the same grad_y values (rounded to the output dtype, as autograd hands it to the kernels).
    grad_y = torch.randn(*x.shape[:-1], weight.shape[0], device=x.device).to(dtype)
    got = run_op(fused_quant_linear, x, weight, bias, clip, step, grad_y, **options)
    expected = run_op(ref.quant_linear, x.double(), weight.double(), bias.double(), clip, step, grad_y, **options)
    assert got[0].dtype == dtype
    for name, actual, wanted in zip(("y", "grad_x", "grad_weight", "grad_bias"), got[:4], expected[:4], strict=True):
        assert_matches(actual, wanted, dtype, name)
    for name, actual, wanted in zip(("grad_clip", "grad_step"), got[4:], expected[4:], strict=True):
        if wanted is None:
            assert actual is None, f"{name} should be None"
            continue
        terms = act_grad_terms(x, weight, clip, step, grad_y, options)
        assert_scalar_grad_matches(name, actual, wanted, terms, dtype)


def _parity_cases():
    """Every (weight method, activation quantizer, dtype) once; granularity / STE / shape rotate across them."""
    granularities = itertools.cycle(["tensor", "row"])
    stes = itertools.cycle(["identity", "clipped", "clipped"])
    shapes = itertools.cycle(["m127-k96-n33", "b2-t5-k96-n40", "m7-k64-n48"])
    for method, act_id, dtype_id in itertools.product(["bwn", "twn", None], ACTS, DTYPES):
        if method is None and act_id == "a-none":
            continue
        granularity, ste, shape = next(granularities), next(stes), next(shapes)
        name = f"{method or 'fp-weight'}-{granularity}-{ste}-{act_id}-{dtype_id}-{shape}"
        yield pytest.param(method, granularity, ste, act_id, dtype_id, shape, id=name)


@pytest.mark.parametrize("method, granularity, ste, act_id, dtype_id, shape_id", list(_parity_cases()))
def test_forward_and_grads_match_reference(device, method, granularity, ste, act_id, dtype_id, shape_id):
    act, dtype = ACTS[act_id], DTYPES[dtype_id]
    x, weight, bias, clip, step = make_inputs(SHAPES[shape_id], act, dtype, device)
    options = options_for(method, granularity, ste, act)
    check_against_float64_reference(x, weight, bias, clip, step, options, dtype)


@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize(
    "method, granularity, act_id",
    [("twn", "row", "a4-lsq-signed"), ("bwn", "tensor", "a8-asym")],
    ids=["twn-row-a4-lsq-signed", "bwn-tensor-a8-asym"],
)
def test_odd_shapes_match_reference(device, shape_id, method, granularity, act_id):
    act = ACTS[act_id]
    x, weight, bias, clip, step = make_inputs(SHAPES[shape_id], act, torch.float32, device, seed=3)
    options = options_for(method, granularity, "identity", act)
    check_against_float64_reference(x, weight, bias, clip, step, options, torch.float32)


@pytest.mark.parametrize(
    "method, act_id", [("bwn", "a8-sym"), ("twn", "a4-lsq-signed")], ids=["bwn-a8-sym", "twn-a4-lsq-signed"]
)
def test_float16_matches_reference(device, method, act_id):
    act = ACTS[act_id]
    x, weight, bias, clip, step = make_inputs(SHAPES["m127-k96-n33"], act, torch.float16, device, seed=13)
    options = options_for(method, "row", "clipped", act)
    check_against_float64_reference(x, weight, bias, clip, step, options, torch.float16)


@pytest.mark.parametrize("method, granularity", [("twn", "tensor"), ("bwn", "row")], ids=["twn-tensor", "bwn-row"])
@pytest.mark.parametrize("act_id", ["a-none", "a8-sym", "a8-asym", "a4-lsq-unsigned", "a4-asym-lsq"])
def test_fused_paths_match_reference(device, monkeypatch, act_id, method, granularity):
    """The "fused" activation and weight paths (codes made inside the GEMM main loops); "codes" is the default."""
    monkeypatch.setattr(kernels_linear, "_ACT_PATH", "fused")
    monkeypatch.setattr(kernels_linear, "_WEIGHT_PATH", "fused")
    act = ACTS[act_id]
    x, weight, bias, clip, step = make_inputs(SHAPES["m127-k96-n33"], act, torch.bfloat16, device, seed=4)
    options = options_for(method, granularity, "clipped", act)
    check_against_float64_reference(x, weight, bias, clip, step, options, torch.bfloat16)


def _exact_inputs(act: Act, device):
    """Inputs whose fake-quant step is a power of two, so y = x_hat @ codes^T is exact in float32 (and in bf16
    up to the output rounding).

    x holds exact half-way points (round half to even), the clip bounds and out-of-range values; the weight holds
    0, -0.0 and values exactly at +-delta (sign(0) = +1, strict ternary threshold).
    """
    generator = torch.Generator().manual_seed(5)
    m, k, n = 33, 96, 40
    if act.method == "sym":  # clip [-15.875, 15.875]: max |x_c| = 15.875 = 127 / 8, step = 1/8
        grid, low, high = 0.125, -15.875, 15.875
    elif act.method == "asym":  # min -4, max -4 + 255/16: zero = -4, step = 1/16
        grid, low, high = 0.0625, -4.0, -4.0 + 255 / 16
    else:  # LSQ step 1/2 (asym_lsq: zero = the min, on the grid too)
        grid, low, high = 0.5, -6.0, 9.0
    x = torch.randint(int(low / grid) - 8, int(high / grid) + 8, (m, k), generator=generator) * grid
    x += torch.where(torch.rand(m, k, generator=generator) < 0.4, grid / 2, 0.0)
    x[0, :4] = torch.tensor([low, high, -grid / 2, grid / 2])
    x[1, :2] = torch.tensor([low - 3, high + 3])
    weight = torch.randint(-3, 4, (n, k), generator=generator).float() * 0.25
    weight[0, :3] = torch.tensor([0.0, -0.0, 0.5])
    weight[1, :2] = torch.tensor([-0.5, 0.5 + 2**-20])
    clip = torch.tensor([low, high])
    if act.method in ("sym", "asym"):
        x[2, 0], x[2, 1] = low, high
    return x.to(device), weight.to(device), clip.to(device), torch.tensor(grid, device=device)


def _exact_cases():
    """Both weight methods, every activation quantizer, fp32 and bf16, each on the default "codes" paths and the
    "fused" ones; the two mixed (activation, weight) paths too for TWN in bf16."""
    for act_id, method, dtype_id in itertools.product(
        ["a8-sym", "a8-asym", "a4-lsq-signed", "a4-lsq-unsigned", "a4-asym-lsq"], ["bwn", "twn"], DTYPES
    ):
        paths = [("codes", "codes"), ("fused", "fused")]
        if dtype_id == "bf16" and method == "twn":
            paths += [("fused", "codes"), ("codes", "fused")]
        for act_path, weight_path in paths:
            yield pytest.param(act_id, method, dtype_id, act_path, weight_path,
                               id=f"{method}-{act_id}-{dtype_id}-act-{act_path}-weight-{weight_path}")


@pytest.mark.parametrize("act_id, method, dtype_id, act_path, weight_path", list(_exact_cases()))
def test_codes_and_grads_exact(device, monkeypatch, act_id, method, dtype_id, act_path, weight_path):
    """weight_scale = 1, a power-of-two activation step and an integer grad_y make every result an exact sum of
    exactly representable terms: the codes, masks and partial sums must equal the reference bit for bit."""
    monkeypatch.setattr(kernels_linear, "_ACT_PATH", act_path)
    monkeypatch.setattr(kernels_linear, "_WEIGHT_PATH", weight_path)
    act, dtype = ACTS[act_id], DTYPES[dtype_id]
    x, weight, clip, step = _exact_inputs(act, device)
    # The codes of the bf16-rounded inputs are compared (bf16 keeps 8 significant bits of the grid values).
    x, weight = x.to(dtype), weight.to(dtype)
    given = dict(weight_scale=torch.ones((), device=device))
    if method == "twn":
        given["weight_threshold"] = torch.tensor(0.5, device=device)
    options = options_for(method, "tensor", "identity", act, **given)
    grad_y = torch.randint(-3, 4, (x.shape[0], weight.shape[0]), generator=torch.Generator().manual_seed(6))
    grad_y = grad_y.to(device, dtype)
    bias = torch.zeros(weight.shape[0], device=device, dtype=dtype)
    got = run_op(fused_quant_linear, x, weight, bias, clip, step, grad_y, **options)
    expected = run_op(ref.quant_linear, x.double(), weight.double(), bias.double(), clip, step, grad_y, **options)
    names = ("y", "grad_x", "grad_weight", "grad_bias", "grad_clip", "grad_step")
    for name, actual, wanted in zip(names, got, expected, strict=True):
        if wanted is None:
            assert actual is None, name
        else:
            wanted = wanted.to(actual.dtype)
            assert torch.equal(actual, wanted), f"{name}: max diff {(actual.double() - wanted.double()).abs().max()}"


@pytest.mark.parametrize("dtype_id", DTYPES)
@pytest.mark.parametrize("act_id", ["a8-sym", "a4-lsq-unsigned", "a4-asym-lsq"])
def test_int8_and_float_forward_dots_agree(device, monkeypatch, act_id, dtype_id):
    """On the codes paths the forward can multiply int8 codes on integer tensor cores (``forward_dot("int8")``); the
    default float dot of the same codes gives the same output and gradients bit for bit (both sums are exact)."""
    act, dtype = ACTS[act_id], DTYPES[dtype_id]
    x, weight, bias, clip, step = make_inputs(SHAPES["m127-k96-n33"], act, dtype, device, seed=8)
    options = options_for("twn", "row", "clipped", act)
    grad_y = torch.randn(x.shape[0], weight.shape[0], generator=torch.Generator().manual_seed(9)).to(device, dtype)
    results = {}
    for kind in kernels_linear.FORWARD_DOTS:
        monkeypatch.setattr(kernels_linear, "_FORWARD_DOT", kind)
        results[kind] = run_op(fused_quant_linear, x, weight, bias, clip, step, grad_y, **options)
    for int8, floating in zip(results["int8"], results["float"], strict=True):
        assert (int8 is None) == (floating is None)
        if int8 is not None:
            assert torch.equal(int8, floating)


def test_given_scale_and_threshold(device):
    """LAT passes (alpha, delta); given scales work for every method, per tensor and per row."""
    act = ACTS["a8-sym"]
    x, weight, bias, clip, step = make_inputs(SHAPES["m127-k96-n33"], act, torch.float32, device, seed=6)
    alpha, delta = ref.lat_scale_threshold(weight, None, "row")
    check_against_float64_reference(
        x, weight, bias, clip, step,
        options_for("lat", "row", "clipped", act, weight_scale=alpha, weight_threshold=delta), torch.float32,
    )
    given = dict(weight_scale=torch.tensor(0.3, device=device), weight_threshold=torch.tensor(0.2, device=device))
    check_against_float64_reference(
        x, weight, bias, clip, step, options_for("twn", "tensor", "identity", act, **given), torch.float32
    )
    row_scale = (torch.rand(weight.shape[0], 1, generator=torch.Generator().manual_seed(6)) + 0.5).to(device)
    check_against_float64_reference(
        x, weight, bias, clip, step,
        options_for("bwn", "row", "identity", act, weight_scale=row_scale), torch.float32,
    )


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("act_id", ["a-none", "a8-sym"])
def test_autocast_bf16(device, x_dtype, act_id):
    act = ACTS[act_id]
    x, weight, bias, clip, step = make_inputs(SHAPES["b2-t5-k96-n40"], act, torch.float32, device, seed=8)
    x = x.to(x_dtype)
    grad_y = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(8)).to(device)
    options = options_for("bwn", "tensor", "identity", act)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        got = run_op(fused_quant_linear, x, weight, bias, clip, step, grad_y, **options)
        expected = run_op(ref.quant_linear, x, weight, bias, clip, step, grad_y, **options)
    assert got[0].dtype == torch.bfloat16
    assert got[1].dtype == x_dtype and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    names = ("y", "grad_x", "grad_weight", "grad_bias")
    for name, actual, wanted in zip(names, got[:4], expected[:4], strict=True):
        assert_matches(actual, wanted, torch.bfloat16, name)
    if act.method is not None:
        terms = act_grad_terms(x, weight, clip, step, grad_y, options)
        assert_scalar_grad_matches("grad_clip", got[4], expected[4], terms, torch.bfloat16)


def test_non_contiguous_inputs_and_no_bias(device):
    act = ACTS["a4-lsq-signed"]
    x, weight, _, clip, step = make_inputs(SHAPES["m127-k96-n33"], act, torch.float32, device, seed=9)
    x_strided = torch.stack([x, x], dim=-1)[..., 0]
    weight_t = weight.t().contiguous().t()
    assert not x_strided.is_contiguous() and not weight_t.is_contiguous()
    options = options_for("twn", "row", "identity", act)
    grad_y = torch.randn(127, 33, generator=torch.Generator().manual_seed(9)).to(device).t().contiguous().t()
    got_x, got_w = x_strided.clone().requires_grad_(), weight_t.detach().clone().requires_grad_()
    y = call(fused_quant_linear, got_x, got_w, None, act_clip=clip, act_step=step, **options)
    y.backward(grad_y)
    ref_x, ref_w = x.double().requires_grad_(), weight.double().requires_grad_()
    expected = call(ref.quant_linear, ref_x, ref_w, None, act_clip=clip, act_step=step, **options)
    expected.backward(grad_y.double())
    assert_matches(y, expected, torch.float32, "y")
    assert_matches(got_x.grad, ref_x.grad, torch.float32, "grad_x")
    assert_matches(got_w.grad, ref_w.grad, torch.float32, "grad_weight")


@pytest.mark.parametrize("wanted", ["x", "weight", "clip"])
def test_only_requested_grads(device, wanted):
    act = ACTS["a8-asym"]
    x, weight, bias, clip, step = make_inputs(SHAPES["m7-k64-n48"], act, torch.float32, device, seed=10)
    tensors = dict(x=x.clone(), weight=weight.clone(), clip=clip.clone())
    tensors[wanted].requires_grad_()
    options = options_for("bwn", "tensor", "identity", act)
    y = call(
        fused_quant_linear, tensors["x"], tensors["weight"], bias, act_clip=tensors["clip"], act_step=step, **options
    )
    y.sum().backward()
    leaves = dict(x=x.double().requires_grad_(), weight=weight.double().requires_grad_(), clip=clip.clone())
    leaves["clip"].requires_grad_()
    expected = call(
        ref.quant_linear, leaves["x"], leaves["weight"], bias.double(), act_clip=leaves["clip"], act_step=step,
        **options,
    )
    expected.sum().backward()
    for name, tensor in tensors.items():
        if name == wanted:
            assert_matches(tensor.grad, leaves[name].grad, torch.float32, f"grad_{name}")
        else:
            assert tensor.grad is None


def test_empty_batch(device):
    act = ACTS["a8-sym"]
    _, weight, bias, clip, step = make_inputs(SHAPES["m7-k64-n48"], act, torch.float32, device)
    x = torch.zeros(0, 64, device=device, requires_grad=True)
    weight.requires_grad_()
    options = options_for("bwn", "tensor", "identity", act)
    y = call(fused_quant_linear, x, weight, bias, act_clip=clip, act_step=step, **options)
    assert y.shape == (0, 48)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_kernel_argument_errors(device):
    act = ACTS["a-none"]
    x, weight, bias, clip, step = make_inputs(SHAPES["m7-k64-n48"], act, torch.float32, device)
    options = options_for("bwn", "tensor", "identity", act)
    with pytest.raises(TypeError, match=r"x must have dtype .* got torch.float64"):
        call(fused_quant_linear, x.double(), weight, bias, act_clip=None, act_step=None, **options)
    with pytest.raises(TypeError, match=r"weight must have dtype"):
        call(fused_quant_linear, x, weight.double(), bias, act_clip=None, act_step=None, **options)
    bad_scale = dict(options, weight_scale=torch.ones(5, device=device))
    with pytest.raises(ValueError, match=r"weight_scale must have 1 or out_features=48 elements, got shape \(5,\)"):
        call(fused_quant_linear, x, weight, bias, act_clip=None, act_step=None, **bad_scale)
    only_scale = dict(options_for("twn", "tensor", "identity", act), weight_scale=torch.ones((), device=device))
    with pytest.raises(ValueError, match="weight_scale and weight_threshold must be given together"):
        call(fused_quant_linear, x, weight, bias, act_clip=None, act_step=None, **only_scale)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize(
    "layer_cls, kwargs",
    [
        (triton_bq.BinaryLinear, dict(act_bits=8)),
        (triton_bq.TernaryLinear, dict(act_bits=4, granularity="row", ste="clipped")),
        (triton_bq.BinaryLinear, dict(act_bits=None, bias=False)),
    ],
    ids=["binary-a8", "ternary-row-clipped-a4", "binary-no-act-no-bias"],
)
def test_module_backends_agree(device, monkeypatch, backend, layer_cls, kwargs):
    calls = []
    original = ops.fused_quant_linear

    def spy(*args, **options):
        calls.append(1)
        return original(*args, **options)

    monkeypatch.setattr(ops, "fused_quant_linear", spy)
    torch.manual_seed(11)
    reference_layer = layer_cls(96, 33, backend="reference", device=device, **kwargs)
    layer = layer_cls(96, 33, backend=backend, device=device, **kwargs)
    layer.load_state_dict(reference_layer.state_dict())
    x = torch.randn(4, 7, 96, device=device) * 2
    outputs = []
    for module in (reference_layer, layer):
        inputs = x.clone().requires_grad_()
        y = module(inputs)
        (y * torch.linspace(-1, 1, 33, device=device)).sum().backward()
        grads = {name: p.grad for name, p in module.named_parameters()}
        outputs.append((y, inputs.grad, grads))
    assert calls, f"backend={backend!r} did not call the fused kernels"
    (y_ref, gx_ref, grads_ref), (y, gx, grads) = outputs
    assert_matches(y, y_ref, torch.float32, "y")
    assert_matches(gx, gx_ref, torch.float32, "grad_x")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_matches(grads[name], grads_ref[name], torch.float32, f"grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks-allowed", "fullgraph"])
def test_torch_compile_matches_eager(fullgraph):
    torch.manual_seed(12)
    model = nn.Sequential(
        triton_bq.BinaryLinear(128, 256, act_bits=8),
        nn.GELU(),
        triton_bq.TernaryLinear(256, 64, act_bits=4, granularity="row"),
    ).cuda()
    x = torch.randn(4, 32, 128, device="cuda")

    def step(module):
        module.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        y = module(inputs)
        y.square().mean().backward()
        return y.detach(), inputs.grad, [p.grad.clone() for p in model.parameters()]

    # The eager step also initialises the LSQ step size (a data-dependent branch kept out of the graph).
    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=fullgraph))
    assert_matches(compiled[0], eager[0], torch.float32, "y")
    assert_matches(compiled[1], eager[1], torch.float32, "grad_x")
    for index, (got, wanted) in enumerate(zip(compiled[2], eager[2], strict=True)):
        assert_matches(got, wanted, torch.float32, f"grad of parameter {index}")
