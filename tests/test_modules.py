"""Quantized layers: forward against the reference, shared Parameters, state dicts, errors, LAT, LSQ init."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_bq
from triton_bq import reference as ref
from triton_bq.ops import resolve_backend


def _linear(seed=0, in_features=12, out_features=5):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("cls, method", [(triton_bq.BinaryLinear, "bwn"), (triton_bq.TernaryLinear, "twn")])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_layer_forward_matches_reference(cls, method, granularity):
    linear = _linear()
    layer = cls.from_linear(linear, granularity=granularity, backend="reference")
    x = torch.randn(3, 4, 12)
    expected = F.linear(x, ref.quantize_weight(linear.weight, method, granularity), linear.bias)
    assert torch.equal(layer(x), expected)


def test_from_linear_shares_parameters_and_to_linear_round_trips():
    linear = _linear()
    layer = triton_bq.BinaryLinear.from_linear(linear, act_bits=8, backend="reference")
    assert layer.weight is linear.weight and layer.bias is linear.bias
    back = layer.to_linear()
    assert type(back) is nn.Linear and back.weight is linear.weight
    x = torch.randn(2, 12)
    assert torch.equal(back(x), linear(x))


def test_act_quantized_layer_matches_reference_and_trains_the_clip():
    linear = _linear()
    layer = triton_bq.BinaryLinear.from_linear(linear, act_bits=8, backend="reference")
    x = torch.randn(8, 12) * 2
    clip = layer.act_quantizer.clip
    options = triton_bq.QuantOptions("bwn", act_method="sym")
    expected = ref.quant_linear(x, linear.weight, linear.bias, options, act_clip=clip)
    out = layer(x)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    # PACT: dL/dclip = (sum of dL/dx_hat over x <= lo, over x >= hi); identity STE: dL/dW = g^T @ Q(x).
    grad_out = 2 * out.detach()
    grad_x_hat = grad_out @ layer.quantized_weight()
    lo, hi = clip.detach().tolist()
    assert bool((x <= lo).any()) and bool((x >= hi).any())
    expected_clip = torch.stack([grad_x_hat[x <= lo].sum(), grad_x_hat[x >= hi].sum()])
    torch.testing.assert_close(clip.grad, expected_clip, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        quantized_x = layer.act_quantizer(x)
    torch.testing.assert_close(linear.weight.grad, grad_out.T @ quantized_x, rtol=1e-5, atol=1e-5)


def test_lsq_step_initialises_once_from_first_batch_and_survives_state_dict():
    layer = triton_bq.TernaryLinear(12, 5, act_bits=4, backend="reference")
    assert layer.act_quantizer.method == "lsq"
    x = torch.randn(8, 12)
    layer(x)
    expected = ref.lsq_init_step(x, 4)
    assert layer.act_quantizer.step.item() == pytest.approx(expected.item())
    layer(x * 10)
    assert layer.act_quantizer.step.item() == pytest.approx(expected.item())
    fresh = triton_bq.TernaryLinear(12, 5, act_bits=4, backend="reference")
    fresh.load_state_dict(layer.state_dict())
    fresh(x * 10)
    assert fresh.act_quantizer.step.item() == pytest.approx(expected.item())
    assert bool(fresh.act_quantizer.initialized)


def test_state_dict_keys_match_nn_linear_without_act_quantization():
    layer = triton_bq.BinaryLinear(12, 5, backend="reference")
    assert set(layer.state_dict()) == {"weight", "bias"}
    plain = nn.Linear(12, 5)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(plain.weight, layer.weight)


def test_state_dict_round_trip_through_bytes():
    layer = triton_bq.TernaryLinear(12, 5, act_bits=8, backend="reference")
    with torch.no_grad():
        layer.act_quantizer.clip.copy_(torch.tensor([-1.25, 2.0]))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = triton_bq.TernaryLinear(12, 5, act_bits=8, backend="reference")
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 12)
    assert torch.equal(other(x), layer(x))


def test_weight_only_fp_layer_is_plain_linear():
    linear = _linear()
    layer = triton_bq.QuantLinear.from_linear(linear, weight_method=None, backend="reference")
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), linear(x))


def test_clipped_ste_masks_large_weights():
    linear = _linear()
    with torch.no_grad():
        linear.weight[0, :3] = torch.tensor([1.5, -2.0, 0.5])
    layer = triton_bq.BinaryLinear.from_linear(linear, ste="clipped", backend="reference")
    layer(torch.randn(4, 12)).sum().backward()
    assert linear.weight.grad[0, 0] == 0 and linear.weight.grad[0, 1] == 0 and linear.weight.grad[0, 2] != 0


def test_lat_layer_reads_adam_second_moment():
    torch.manual_seed(0)
    layer = triton_bq.TernaryLinear(12, 5, weight_method="lat", backend="reference")
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    assert triton_bq.attach_optimizer(layer, optimizer) == 1
    x = torch.randn(16, 12)
    layer(x).square().sum().backward()
    optimizer.step()
    moment = optimizer.state[layer.weight]["exp_avg_sq"]
    alpha, delta = ref.lat_scale_threshold(layer.weight, moment)
    expected = F.linear(x, alpha * ref.twn_codes(layer.weight, delta), layer.bias)
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    alpha_plain, _ = ref.lat_scale_threshold(layer.weight, None)
    assert not torch.isclose(alpha, alpha_plain)


def test_lat_without_optimizer_warns_once_and_uses_unit_weights():
    layer = triton_bq.TernaryLinear(12, 5, weight_method="lat", backend="reference")
    with pytest.warns(UserWarning, match="attach_optimizer"):
        out = layer(torch.randn(2, 12))
    alpha, delta = ref.lat_scale_threshold(layer.weight, None)
    assert torch.allclose(layer.quantized_weight(), alpha * ref.twn_codes(layer.weight, delta))
    assert out.shape == (2, 5)


def test_quant_embedding_equals_rowwise_quantized_table_and_grads():
    torch.manual_seed(0)
    embedding = nn.Embedding(20, 8, padding_idx=0)
    ids = torch.tensor([[1, 5, 5, 0], [19, 2, 3, 5]])
    for method in ("bwn", "twn"):
        embedding.weight.grad = None
        layer = triton_bq.QuantEmbedding.from_embedding(embedding, weight_method=method)
        assert layer.weight is embedding.weight
        table = ref.quantize_weight(embedding.weight.detach(), method, "row")
        out = layer(ids)
        assert torch.equal(out, F.embedding(ids, table))
        upstream = torch.randn_like(out)
        out.backward(upstream)
        weight = embedding.weight.detach().clone().requires_grad_()
        F.embedding(ids, weight, padding_idx=0).backward(upstream)
        assert torch.equal(embedding.weight.grad, weight.grad)
    assert type(layer.to_embedding()) is nn.Embedding


def test_backend_resolution():
    cpu = torch.zeros(1)
    assert resolve_backend("reference", cpu) == "reference"
    assert resolve_backend("triton", cpu) == "triton"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", cpu)


def test_auto_backend_uses_triton_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.zeros(1)) == "triton"
    for dtype in (torch.bfloat16, torch.float16):
        assert resolve_backend("auto", torch.zeros(1, dtype=dtype)) == "triton"
    # The kernels take fp32/bf16/fp16 only: float64 (gradient checks) goes to the reference.
    assert resolve_backend("auto", torch.zeros(1, dtype=torch.float64)) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", torch.zeros(1)) == "reference"


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: triton_bq.QuantLinear(4, 4, weight_method="xnor"), ValueError, "xnor"),
        (lambda: triton_bq.QuantLinear(4, 4, granularity="col"), ValueError, "col"),
        (lambda: triton_bq.QuantLinear(4, 4, act_bits=3.5), ValueError, "3.5"),
        (lambda: triton_bq.QuantLinear(4, 4, act_bits=16), ValueError, "16"),
        (lambda: triton_bq.QuantLinear(4, 4, act_bits=None, act_method="sym"), ValueError, "act_bits"),
        (lambda: triton_bq.QuantLinear(4, 4, backend="cuda"), ValueError, "cuda"),
        (lambda: triton_bq.QuantLinear(4, 4, ste="tanh"), ValueError, "tanh"),
        (lambda: triton_bq.BinaryLinear(4, 4, weight_method="twn"), ValueError, "twn"),
        (lambda: triton_bq.TernaryLinear(4, 4, weight_method="bwn"), ValueError, "bwn"),
        (lambda: triton_bq.BinaryLinear.from_linear(nn.Conv1d(4, 4, 1)), TypeError, "Conv1d"),
        (lambda: triton_bq.QuantEmbedding(10, 4, weight_method="int4"), ValueError, "int4"),
    ],
    ids=["method", "granularity", "bits-float", "bits-16", "method-without-bits", "backend", "ste", "binary-twn",
         "ternary-bwn", "not-linear", "embedding-method"],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(2, 7)), ValueError, "last dim"),
        (dict(x=torch.randint(0, 3, (2, 12))), TypeError, "int64"),
        (dict(bias=torch.randn(4)), ValueError, "bias"),
        (dict(options=dict(act_method="sym")), ValueError, "act_clip"),
        (dict(options=dict(act_method="lsq")), ValueError, "act_step"),
        (dict(options=dict(weight_method="lat")), ValueError, "weight_scale"),
        (dict(options=dict(weight_method="bwn", granularity="rows")), ValueError, "granularity must be one of"),
        (dict(options=dict(act_method="sym", act_bits=1)), ValueError, r"act_bits must be an int in 2\.\.8, got 1"),
        (dict(options="bwn"), TypeError, "options must be a triton_bq.QuantOptions, got str"),
    ],
    ids=["shape", "int-input", "bias-shape", "missing-clip", "missing-step", "lat-without-scale", "granularity",
         "bits", "options-type"],
)
def test_functional_rejects_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(2, 12), weight=torch.randn(5, 12), backend="reference")
    args.update(kwargs)
    x, weight = args.pop("x"), args.pop("weight")
    with pytest.raises(error, match=match):
        options = args.pop("options", {})
        options = triton_bq.QuantOptions(**options) if isinstance(options, dict) else options
        triton_bq.quant_linear(x, weight, options=options, **args)


def test_torch_compile_fullgraph_on_the_reference_backend():
    """Dynamo captures the layers whole (no graph break), forward and backward; the GPU test covers the kernels."""
    torch.manual_seed(0)
    model = nn.Sequential(
        triton_bq.BinaryLinear(64, 96, act_bits=8, backend="reference"),
        nn.GELU(),
        triton_bq.TernaryLinear(96, 32, act_bits=4, granularity="row", backend="reference"),
    )
    x = torch.randn(4, 8, 64)

    def step(module):
        model.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        y = module(inputs)
        y.square().mean().backward()
        return [y.detach(), inputs.grad] + [parameter.grad.clone() for parameter in model.parameters()]

    # The eager step initialises the LSQ step size (data-dependent, kept out of the graph).
    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert len(compiled) == len(eager) == 2 + len(list(model.parameters()))
    for got, wanted in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, wanted, rtol=1e-6, atol=1e-6)
