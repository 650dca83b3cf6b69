"""BinaryBERT's asymmetric LSQ (``act_method="asym_lsq"``, its ``AsymLsqQuantizer``): a hand-computed case of its
formulas on both backends, the fused kernels against the reference per token, the A4 defaults of ``quantize_`` /
``quantize_attention``, save / reload and packing. Per-tensor fused parity runs in ``test_kernels_linear`` (the
``a4-asym-lsq`` activation), data-parallel sync in ``test_distributed``."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from test_act_granularity import _inputs
from test_causal_lm import TOLERANCE, causal_gaps, tiny_gpt2
from test_kernels_linear import SHAPES, assert_matches, assert_scalar_grad_matches
from tiny_bert import bert_inputs, tiny_bert
from triton_bq.kernels import _common, scales
from triton_bq.kernels import linear as kernels_linear
from triton_bq.kernels.linear import fused_quant_linear

import triton_bq
from triton_bq import ops
from triton_bq import reference as ref
from triton_bq.export import format as export_format
from triton_bq.nn import packed as packed_module
from triton_bq.nn.attention import quantize_attention
from triton_bq.options import QuantOptions


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


# BinaryBERT's AsymLsqQuantizer by hand, 2 bits (Qn = 0, Qp = 3), step alpha = 0.5, min_val = -1:
# v = (x - min) / alpha = [0, 1, 2.5, 3, 3.5, 6]; q = clamp(round(v), 0, 3) = [0, 1, 2, 3, 3, 3] (2.5 -> 2, half to
# even; 3.5 -> 4 -> 3); out = q * alpha + min. indicate_small = v < 0 (none), indicate_big = v > 3 (the last two):
# grad_input = grad_out * middle; grad_alpha = sum((small * Qn + big * Qp + middle * (round(v) - v)) * grad_out)
# / sqrt(numel * Qp) = (3 * -0.5 + 5 * 3 + 6 * 3) / sqrt(18). The minimum (v = 0) and v = Qp are inside (strict).
HAND_X = [-1.0, -0.5, 0.25, 0.5, 0.75, 2.0]
HAND_GRAD = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
HAND_OUT = [-1.0, -0.5, 0.0, 0.5, 0.5, 0.5]
HAND_GRAD_X = [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]
HAND_GRAD_STEP = 31.5 / math.sqrt(18)


def test_hand_computed_case_of_binarybert_formulas_reference():
    x = torch.tensor(HAND_X, requires_grad=True)
    step = torch.tensor([0.5], requires_grad=True)
    out = ref.quantize_act(x, "asym_lsq", 2, step=step)
    out.backward(torch.tensor(HAND_GRAD))
    assert out.tolist() == HAND_OUT
    assert x.grad.tolist() == HAND_GRAD_X
    assert step.grad.item() == pytest.approx(HAND_GRAD_STEP, rel=1e-6)
    # Signed LSQ's tests (v <= Qn, v >= Qp) would stop the minimum's gradient: asym_lsq follows BinaryBERT's.
    assert ref.act_qrange("asym_lsq", 2) == (0, 3)


def test_hand_computed_case_on_the_fused_kernels(device):
    """An identity weight makes y = x_hat: the fused forward, grad_x and step gradient give the hand values."""
    x = torch.tensor([HAND_X], device=device, requires_grad=True)
    weight = torch.eye(6, device=device, requires_grad=True)
    step = torch.tensor([0.5], device=device, requires_grad=True)
    options = QuantOptions(weight_method=None, act_method="asym_lsq", act_bits=2)
    y = fused_quant_linear(x, weight, None, options, act_step=step)
    y.backward(torch.tensor([HAND_GRAD], device=device))
    assert y.tolist() == [HAND_OUT]
    assert x.grad.tolist() == [HAND_GRAD_X]
    assert step.grad.item() == pytest.approx(HAND_GRAD_STEP, rel=1e-6)
    # grad_w = x_hat^T @ grad_y through the zero point's grad-sum epilogue.
    expected_grad_w = torch.tensor(HAND_GRAD).reshape(6, 1) @ torch.tensor(HAND_OUT).reshape(1, 6)
    assert torch.equal(weight.grad.cpu(), expected_grad_w)


def test_step_init_is_four_mean_abs_over_sqrt_qp():
    x = torch.tensor(HAND_X)
    expected = 4 * (5 / 6) / math.sqrt(3)  # mean |x| of the raw input (before the min shift), Qp = 2^2 - 1
    assert ref.lsq_init_step(x, 2, method="asym_lsq").item() == pytest.approx(expected, rel=1e-6)
    assert ref.lsq_init_step(x, 2).item() == pytest.approx(2 * (5 / 6) / math.sqrt(1), rel=1e-6)  # signed: Qp = 1
    quantizer = triton_bq.ActQuantizer(4, "asym_lsq")
    quantizer(x)
    assert quantizer.step.item() == pytest.approx(4 * (5 / 6) / math.sqrt(15), rel=1e-6)
    assert bool(quantizer.initialized) and "asym_lsq" in repr(quantizer)
    with pytest.raises(ValueError, match="method"):
        ref.lsq_init_step(x, 4, method="asym")


def test_device_params_equal_reference_exactly(device):
    x, _, _, _ = _inputs(SHAPES["m127-k96-n33"], torch.float32, device, seed=2)
    x[::3] = x[::3].abs() + 0.25  # rows with a positive min, whose zero point is 0
    step = torch.tensor([0.37], device=device)
    params, qmin, qmax = scales.act_params(x, "asym_lsq", 4, step=step)
    lo, hi, zero, expected_step, _, _ = ref.act_params(x, "asym_lsq", 4, step=step)
    assert (qmin, qmax) == (0, 15)
    assert torch.equal(params, torch.stack([lo, hi, zero, expected_step])) and zero.item() == x.min().item()
    params, _, _ = scales.act_params(x, "asym_lsq", 4, step=step, granularity="per_token")
    lo, hi, zero, expected_step, _, _ = ref.act_params(x, "asym_lsq", 4, step=step, granularity="per_token")
    rows = params[scales.ROW_PARAMS_OFFSET:].reshape(-1, 2)
    assert torch.equal(rows[:, 0], zero.reshape(-1))
    assert torch.equal(zero.reshape(-1), x.amin(dim=1).clamp(max=0))  # a row's range includes 0
    assert (x.amin(dim=1) > 0).any() and (x.amin(dim=1) < 0).any()
    assert torch.equal(rows[:, 1], expected_step.expand(rows.shape[0]))
    with pytest.raises(ValueError, match="act_step"):
        scales.act_params(x, "asym_lsq", 4)


def _step_terms(x, weight, weight_method, granularity, step, grad_y):
    """The float64 terms of the asym_lsq step gradient, per-token zero points min(row min, 0)."""
    w = weight.detach().double()
    if weight_method is not None:
        w = ref.quantize_weight(w, weight_method, granularity)
    g = grad_y.double().reshape(-1, w.shape[0]) @ w
    xf = x.detach().double().reshape(g.shape)
    v = (xf - xf.amin(dim=1, keepdim=True).clamp(max=0)) / step.double()
    local = torch.where(v < 0, 0.0, torch.where(v > 15, 15.0, torch.round(v) - v))
    return [(g * local).reshape(-1) / math.sqrt(xf.numel() * 15)]


def _run(op, x, weight, bias, step, options, grad_y):
    x, weight, bias, step = (t.detach().clone().requires_grad_() for t in (x, weight, bias, step))
    y = op(x, weight, bias, options, act_step=step)
    y.backward(grad_y.to(y.dtype))
    return y, x.grad, weight.grad, bias.grad, step.grad


def _per_token_cases():
    for (method, granularity), dtype_id in itertools.product([("bwn", "tensor"), ("twn", "row")], ["fp32", "bf16"]):
        for act_path in kernels_linear.ACT_PATHS if dtype_id == "bf16" else ("fused",):
            name = f"{method}-{granularity}-{dtype_id}-{act_path}"
            yield pytest.param(method, granularity, dtype_id, act_path, id=name)


@pytest.mark.parametrize("method, granularity, dtype_id, act_path", list(_per_token_cases()))
def test_per_token_fused_matches_reference(device, monkeypatch, method, granularity, dtype_id, act_path):
    monkeypatch.setattr(kernels_linear, "_ACT_PATH", act_path)
    monkeypatch.setattr(kernels_linear, "_WEIGHT_PATH", act_path)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_id]
    x, weight, bias, _ = _inputs(SHAPES["b2-t5-k96-n40"], dtype, device)
    x[:, :2] = x[:, :2].abs() + 0.5  # rows with a positive min (zero point 0)
    step = torch.tensor([0.05], device=device)  # rows of range 0.01 .. 10: some saturate, some use few codes
    options = QuantOptions(method, granularity, "clipped", "asym_lsq", 4, act_granularity="per_token")
    grad_y = torch.randn(*x.shape[:-1], weight.shape[0], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = _run(fused_quant_linear, x, weight, bias, step, options, grad_y)
    expected = _run(ref.quant_linear, x.double(), weight.double(), bias.double(), step, options, grad_y)
    for name, actual, wanted in zip(("y", "grad_x", "grad_weight", "grad_bias"), got[:4], expected[:4], strict=True):
        assert_matches(actual, wanted, dtype, name)
    terms = _step_terms(x, weight, method, granularity, step, grad_y)
    assert_scalar_grad_matches("grad_step", got[4], expected[4], terms, dtype)


def test_per_token_rows_are_independent(device):
    x, weight, bias, _ = _inputs(SHAPES["m7-k64-n48"], torch.float32, device, seed=3)
    step = torch.tensor([0.2], device=device)
    options = QuantOptions("twn", act_method="asym_lsq", act_bits=4, act_granularity="per_token")
    for op in (fused_quant_linear, ref.quant_linear):
        whole = op(x, weight, bias, options, act_step=step)
        rows = torch.cat([op(x[i:i + 1], weight, bias, options, act_step=step) for i in range(7)])
        torch.testing.assert_close(whole, rows, rtol=1e-6, atol=1e-5)  # a flipped code would move y by ~0.1
        per_tensor = op(x, weight, bias, options.replace(act_granularity="per_tensor"), act_step=step)
        assert not torch.allclose(whole, per_tensor)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_nan_input_propagates_like_the_reference(device, granularity):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5)).to(device)
    x[2, 3] = float("nan")
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(6)).to(device)
    step = torch.tensor([0.3], device=device)
    options = QuantOptions("bwn", act_method="asym_lsq", act_bits=4, act_granularity=granularity)
    got = fused_quant_linear(x, weight, None, options, act_step=step)
    expected = ref.quant_linear(x, weight, None, options, act_step=step)
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan()[2].all()
    assert got.isnan().all() == (granularity == "per_tensor")


def test_op_needs_a_step():
    x, weight = torch.randn(3, 8), torch.randn(4, 8)
    options = QuantOptions(act_method="asym_lsq", act_bits=4)
    with pytest.raises(ValueError, match="asym_lsq.*act_step"):
        ops.quant_linear(x, weight, None, options, act_clip=torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="asym_lsq.*act_step"):
        ref.quantize_act(x, "asym_lsq", 4)


def test_a4_defaults_follow_binarybert():
    """BERT at A4: signed LSQ everywhere but the FFN-output input and the attention probabilities, which get
    asymmetric LSQ; the probabilities' step starts at 4 * mean|p| / sqrt(15). A8 keeps min-max there."""
    model = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig("bwn", act_bits=4, backend="reference"))
    layer = model.bert.encoder.layer[0]
    assert layer.output.dense.act_quantizer.method == "asym_lsq"
    assert layer.intermediate.dense.act_quantizer.method == "lsq"
    attention = layer.attention.self
    assert attention.probs_quantizer.method == "asym_lsq" and attention.query_quantizer.method == "lsq"
    seen = []
    attention.probs_quantizer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**bert_inputs())
    expected = 4 * seen[0].float().abs().mean() / math.sqrt(15)
    assert attention.probs_quantizer.step.item() == pytest.approx(expected.item(), rel=1e-6)
    eight = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig("bwn", act_bits=8, backend="reference"))
    assert eight.bert.encoder.layer[0].output.dense.act_quantizer.method == "asym"
    assert eight.bert.encoder.layer[0].attention.self.probs_quantizer.method == "asym"
    with pytest.raises(ValueError, match="probs_method"):
        quantize_attention(tiny_bert().bert.encoder.layer[0].attention.self, 4, probs_method="sym")


def test_causal_lm_a4_asym_lsq_is_per_token_and_causal():
    model = tiny_gpt2()
    triton_bq.quantize_(model, triton_bq.QuantConfig("bwn", act_bits=4, backend="reference"))
    asym = [module.act_quantizer for module in model.modules()
            if isinstance(module, triton_bq.QuantLinear) and module.act_quantizer is not None
            and module.act_quantizer.method == "asym_lsq"]
    assert asym and all(quantizer.granularity == "per_token" for quantizer in asym)
    prefix_gap, batch_gap = causal_gaps(model)
    assert prefix_gap <= TOLERANCE and batch_gap <= TOLERANCE, (prefix_gap, batch_gap)


def test_save_and_reload_is_exact_and_old_records_keep_unsigned_lsq(tmp_path):
    model = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig("twn", act_bits=4, backend="reference"))
    inputs = bert_inputs()
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules"]
    assert record["bert.encoder.layer.0.output.dense"]["act_method"] == "asym_lsq"
    assert record["bert.encoder.layer.0.attention.self"]["probs_method"] == "asym_lsq"
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.bert.encoder.layer[0].attention.self.probs_quantizer.method == "asym_lsq"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, expected)
    # A record written before probs_method existed had unsigned LSQ probabilities at A4: it rebuilds them.
    old = {name: {key: value for key, value in entry.items() if key != "probs_method"}
           for name, entry in record.items() if entry.get("type") == "QuantSelfAttention"}
    fresh = tiny_bert()
    export_format.build_modules(fresh, old)
    probs = fresh.bert.encoder.layer[0].attention.self.probs_quantizer
    assert probs.method == "lsq" and probs.signed is False


def test_packed_layer_uses_the_training_codes(monkeypatch):
    """PackedLinear of an asym_lsq layer fake-quantizes with the training's zero point and step (float kernel)."""
    torch.manual_seed(0)
    layer = triton_bq.QuantLinear(100, 33, weight_method="bwn", act_bits=4, act_method="asym_lsq",
                                  backend="reference").eval()
    x = torch.randn(2, 5, 100)
    with torch.no_grad():
        expected = layer(x)  # initializes the step
    packed = packed_module.PackedLinear.from_quant_linear(layer, backend="auto")
    seen = []
    original = packed_module.packed_linear

    def spy(inputs, *args, **kwargs):
        seen.append(inputs)
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(packed_module, "packed_linear", spy)
    with torch.no_grad():
        got = packed(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    step = layer.act_quantizer.step.detach()
    codes = torch.clamp(torch.round((x - x.min()) / step), 0, 15)
    assert torch.equal(seen[0], codes * step + x.min())
    assert packed.manifest_entry()["act"]["method"] == "asym_lsq"
    assert packed_module.act_quantizer_from_entry(packed.manifest_entry()["act"]).method == "asym_lsq"
