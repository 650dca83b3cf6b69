"""Per-token activation scales (``act_granularity="per_token"``), NaN / inf / empty inputs, non-finite TWN weights:
the fused kernels against ``triton_bq.reference`` (CUDA when present, else the Triton interpreter)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_kernels_linear import SHAPES, TOLERANCES, assert_matches
from triton_bq.kernels import _common, scales
from triton_bq.kernels import linear as kernels_linear
from triton_bq.kernels.linear import fused_quant_linear

import triton_bq
from triton_bq import reference as ref
from triton_bq.nn import packed as packed_module
from triton_bq.options import QuantOptions


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def _inputs(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    m = 1
    for size in shape.batch:
        m *= size
    # Rows of very different ranges, so per-token steps differ by orders of magnitude.
    row_range = torch.logspace(-2, 1, m).reshape(*shape.batch, 1)
    x = torch.randn(*shape.batch, shape.k, generator=generator) * row_range
    weight = torch.randn(shape.n, shape.k, generator=generator) * 0.8
    bias = torch.randn(shape.n, generator=generator)
    clip = torch.tensor([-2.5, 2.0])
    return x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype), clip.to(device)


def _run(op, x, weight, bias, clip, options, grad_y, step=None):
    x, weight, bias, clip = (t.detach().clone().requires_grad_() for t in (x, weight, bias, clip))
    if step is not None:
        step = step.detach().clone().requires_grad_()
    y = op(x, weight, bias, options, act_clip=clip, act_step=step)
    y.backward(grad_y.to(y.dtype))
    return y, x.grad, weight.grad, bias.grad, clip.grad, None if step is None else step.grad


def _per_token_cases():
    """Every weight method x sym / asym x dtype on the fused activation and weight paths; both on the "codes" paths
    in bf16."""
    for (method, granularity), act_method, dtype_id in itertools.product(
        [("bwn", "tensor"), ("twn", "row"), (None, "tensor")], ["sym", "asym"], ["fp32", "bf16"]
    ):
        for act_path in kernels_linear.ACT_PATHS if dtype_id == "bf16" else ("fused",):
            name = f"{method}-{granularity}-{act_method}-{dtype_id}-{act_path}"
            yield pytest.param(method, granularity, act_method, dtype_id, act_path, id=name)


@pytest.mark.parametrize("method, granularity, act_method, dtype_id, act_path", list(_per_token_cases()))
def test_per_token_forward_and_grads_match_reference(device, monkeypatch, method, granularity, act_method, dtype_id,
                                                     act_path):
    """y, grad_x, grad_w, grad_bias and the PACT clip gradient of per-token sym / asym against float64."""
    monkeypatch.setattr(kernels_linear, "_ACT_PATH", act_path)
    monkeypatch.setattr(kernels_linear, "_WEIGHT_PATH", act_path)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_id]
    shape = SHAPES["b2-t5-k96-n40"] if method is None else SHAPES["m127-k96-n33"]
    x, weight, bias, clip = _inputs(shape, dtype, device)
    options = QuantOptions(method, granularity, "clipped" if method else "identity", act_method, 8,
                           act_granularity="per_token")
    grad_y = torch.randn(*x.shape[:-1], weight.shape[0], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = _run(fused_quant_linear, x, weight, bias, clip, options, grad_y)
    expected = _run(ref.quant_linear, x.double(), weight.double(), bias.double(), clip, options, grad_y)
    for name, actual, wanted in zip(("y", "grad_x", "grad_weight", "grad_bias"), got[:4], expected[:4], strict=True):
        assert_matches(actual, wanted, dtype, name)
    # The clip gradient is a sum of grad-x terms at clipped positions: bounded relative to their magnitudes.
    assert got[4].shape == (2,)
    error = (got[4].double() - expected[4].double()).abs().max().item()
    assert error <= TOLERANCES[dtype].relative * expected[4].double().abs().sum().item() + 1e-6, (got[4], expected[4])


@pytest.mark.parametrize("act_method", ["sym", "asym"])
def test_per_token_params_equal_reference_exactly(device, act_method):
    x, _, _, clip = _inputs(SHAPES["m127-k96-n33"], torch.float32, device, seed=2)
    params, _, _ = scales.act_params(x, act_method, 8, clip=clip, granularity="per_token")
    lo, hi, zero, step, _, _ = ref.act_params(x, act_method, 8, clip=clip, granularity="per_token")
    rows = params[scales.ROW_PARAMS_OFFSET:].reshape(-1, 2)
    assert torch.equal(params[:2], torch.stack([lo, hi]))
    assert torch.equal(rows[:, 0], zero.reshape(-1)) and torch.equal(rows[:, 1], step.reshape(-1))


def test_per_token_rows_are_independent(device):
    """Each row's output equals that row quantized alone (the property a causal LM needs)."""
    x, weight, bias, clip = _inputs(SHAPES["m7-k64-n48"], torch.float32, device, seed=3)
    for act_method in ("sym", "asym"):
        options = QuantOptions("twn", "tensor", act_method=act_method, act_granularity="per_token")
        whole = fused_quant_linear(x, weight, bias, options, act_clip=clip)
        rows = torch.cat([fused_quant_linear(x[i:i + 1], weight, bias, options, act_clip=clip) for i in range(7)])
        assert torch.equal(whole, rows)
        per_tensor = fused_quant_linear(x, weight, bias, options.replace(act_granularity="per_tensor"), act_clip=clip)
        assert not torch.equal(whole, per_tensor)


def test_lsq_reads_the_learned_step_whatever_the_granularity(device):
    x, weight, bias, clip = _inputs(SHAPES["m7-k64-n48"], torch.float32, device, seed=4)
    step = torch.tensor([0.3], device=device)
    grad_y = torch.randn(7, 48, device=device)
    options = QuantOptions("bwn", act_method="lsq", act_bits=4)
    per_tensor = _run(fused_quant_linear, x, weight, bias, clip, options, grad_y, step)
    per_token = _run(fused_quant_linear, x, weight, bias, clip, options.replace(act_granularity="per_token"), grad_y,
                     step)
    for got, wanted in zip(per_token, per_tensor, strict=True):
        assert (got is None and wanted is None) or torch.equal(got, wanted)


def _non_finite_input(device):
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5)).to(device)
    x[2, 3] = float("nan")
    x[5, 7] = float("inf")
    x[6, 1] = -float("inf")
    return x


@pytest.mark.parametrize(
    "act_method, act_granularity",
    [(None, "per_tensor"), ("sym", "per_tensor"), ("asym", "per_tensor"), ("sym", "per_token"),
     ("asym", "per_token"), ("lsq", "per_tensor")],
)
def test_nan_and_inf_inputs_propagate_like_the_reference(device, act_method, act_granularity):
    x = _non_finite_input(device)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(6)).to(device)
    clip, step = torch.tensor([-2.0, 2.0], device=device), torch.tensor([0.25], device=device)
    options = QuantOptions("bwn", act_method=act_method, act_bits=8 if act_method != "lsq" else 4,
                           act_granularity=act_granularity)
    got = fused_quant_linear(x, weight, None, options, act_clip=clip, act_step=step)
    expected = ref.quant_linear(x.double(), weight.double(), None, options, act_clip=clip, act_step=step)
    assert torch.equal(got.isnan(), expected.isnan()), (got.isnan().sum(), expected.isnan().sum())
    assert got.isnan().any()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite)
    if finite.any():
        assert_matches(got[finite], expected[finite].float(), torch.float32, "finite part of y")


def test_per_token_nan_poisons_only_its_row(device):
    x = _non_finite_input(device)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(7)).to(device)
    options = QuantOptions("bwn", act_method="sym", act_granularity="per_token")
    y = fused_quant_linear(x, weight, None, options, act_clip=torch.tensor([-2.0, 2.0], device=device))
    assert y[2].isnan().all() and not y[torch.arange(9, device=device) != 2].isnan().any()


@pytest.mark.parametrize("act_method, act_granularity", [("sym", "per_token"), ("asym", "per_tensor"),
                                                          ("lsq", "per_tensor")])
def test_empty_batch_gives_empty_output_and_zero_grads(device, act_method, act_granularity):
    weight = torch.randn(48, 64, device=device, requires_grad=True)
    bias = torch.randn(48, device=device, requires_grad=True)
    clip = torch.tensor([-2.0, 2.0], device=device, requires_grad=True)
    step = torch.tensor([0.3], device=device, requires_grad=True)
    x = torch.zeros(2, 0, 64, device=device, requires_grad=True)
    options = QuantOptions("twn", act_method=act_method, act_bits=8 if act_method != "lsq" else 4,
                           act_granularity=act_granularity)
    y = fused_quant_linear(x, weight, bias, options, act_clip=clip, act_step=step)
    assert y.shape == (2, 0, 48)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for tensor in (weight, bias, clip if act_method != "lsq" else step):
        assert torch.equal(tensor.grad, torch.zeros_like(tensor)), tensor.grad
    expected = ref.quant_linear(x, weight, bias, options, act_clip=clip, act_step=step)
    assert expected.shape == (2, 0, 48)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_twn_weight_gives_nan_scale_not_a_zero_layer(device, granularity, bad):
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(8)).to(device)
    weight[3, 5] = bad
    alpha, delta = scales.weight_scale_threshold(weight, "twn", granularity)
    expected_alpha, expected_delta = ref.weight_scale_threshold(weight, "twn", granularity)
    torch.testing.assert_close(alpha, expected_alpha, equal_nan=True, rtol=1e-6, atol=0)
    torch.testing.assert_close(delta, expected_delta, equal_nan=True, rtol=1e-6, atol=0)
    assert alpha.isnan().any()
    if granularity == "row":
        assert alpha.isnan().sum() == 1 and alpha[3].isnan()
    x = torch.randn(5, 40, device=device)
    y = fused_quant_linear(x, weight, None, QuantOptions("twn", granularity))
    assert y.isnan().any(), "a non-finite weight must not silently zero the layer"


@pytest.mark.parametrize("act_method", ["sym", "asym"])
def test_packed_per_token_layer_uses_the_training_codes(device, monkeypatch, act_method):
    """PackedLinear of a per-token layer: the int8 activations (sym) are the training codes, one scale per token,
    and the output equals the training layer's; the manifest keeps the granularity."""
    torch.manual_seed(0)
    layer = triton_bq.QuantLinear(100, 33, weight_method="bwn", act_bits=8, act_method=act_method,
                                  act_granularity="per_token", backend="reference").to(device).eval()
    x = (torch.randn(2, 5, 100) * torch.logspace(-2, 1, 10).reshape(2, 5, 1)).to(device)
    packed = packed_module.PackedLinear.from_quant_linear(layer, backend="auto")
    seen = []
    original = packed_module.packed_linear

    def spy(inputs, *args, **kwargs):
        seen.append((inputs, kwargs.get("x_scale")))
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(packed_module, "packed_linear", spy)
    with torch.no_grad():
        got, expected = packed(x), layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    lo, hi, zero, step, qmin, qmax = ref.act_params(x, act_method, 8, clip=layer.act_quantizer.clip,
                                                    granularity="per_token")
    codes = torch.clamp(torch.round((torch.clamp(x, lo, hi) - zero) / step), qmin, qmax)
    inputs, x_scale = seen[0]
    if act_method == "sym":
        assert inputs.dtype == torch.int8 and torch.equal(inputs.float(), codes)
        assert torch.equal(x_scale.reshape(-1), step.reshape(-1))  # one scale per token
    else:
        assert torch.equal(inputs, (codes * step + zero).to(x.dtype))
    entry = packed.manifest_entry()["act"]
    assert entry["granularity"] == "per_token"
    assert packed_module.act_quantizer_from_entry(entry).granularity == "per_token"
    old_entry = {key: value for key, value in entry.items() if key != "granularity"}
    assert packed_module.act_quantizer_from_entry(old_entry).granularity == "per_tensor"
