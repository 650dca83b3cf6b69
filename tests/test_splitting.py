"""Ternary weight splitting: exactness (tensors, layers, a small BERT), edge cases, partial split, knapsack."""

import copy
import importlib.util
import io
import itertools
import random

import pytest
import torch
from tiny_bert import bert_inputs, tiny_bert
from torch import nn

import triton_bq
from triton_bq import reference as ref
from triton_bq.nn import SplitBinaryEmbedding, SplitBinaryLinear
from triton_bq.recipe.adaptive import choose_splits, measure_split_sensitivity, split_candidates, split_costs
from triton_bq.recipe.tws import is_ternary_module, split_ternary_to_binary, split_ternary_weight, tws_coefficients

EPS32 = torch.finfo(torch.float32).eps
# BWN(w1) + BWN(w2) vs TWN(w) in float32: the scales are float32 reductions, so equality holds to a few ulps of
# alpha_t (measured <= 2 eps * alpha_t on matrices up to 30522 x 768); this bound has a 2x margin.
SCALE_TOL_EPS = 4


def _assert_close_to_ternary(actual, expected, alpha):
    """Elementwise within SCALE_TOL_EPS float32 eps of the largest ternary scale (zeros included)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=SCALE_TOL_EPS * EPS32 * float(alpha.max()))


def _bwn_sum(w1, w2, granularity):
    return ref.quantize_weight(w1, "bwn", granularity).float() + ref.quantize_weight(w2, "bwn", granularity).float()


def _assert_tws_exact(granularity, w1, w2, codes, alpha):
    """Codes exactly where alpha > 0 (all-zero groups have alpha = 0); values to SCALE_TOL_EPS eps of alpha."""
    binary_codes = (ref.bwn_codes(w1).float() + ref.bwn_codes(w2).float()) / 2
    live = (alpha > 0).expand_as(codes)
    assert torch.equal(binary_codes[live], codes.float()[live])
    assert torch.equal(ref.bwn_codes(w1).float()[codes != 0], codes.float()[codes != 0])
    expected = alpha.float() * codes.float()
    bound = SCALE_TOL_EPS * EPS32 * alpha.float()
    assert bool(((_bwn_sum(w1, w2, granularity) - expected).abs() <= bound).all())


SHAPES = {"1x1": (1, 1), "7x33": (7, 33), "64x96": (64, 96), "127x48": (127, 48), "768x768": (768, 768)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_tws_is_exact_on_random_matrices(shape, granularity, dtype):
    torch.manual_seed(sum(shape))
    weight = (torch.randn(shape) * 0.05).to(dtype)
    w1, w2 = split_ternary_weight(weight, granularity)
    assert w1.dtype == dtype and w2.dtype == dtype and w1.shape == weight.shape
    delta = ref.twn_threshold(weight, granularity)
    codes = ref.twn_codes(weight, delta)
    alpha = ref.twn_scale(weight, delta, granularity)
    _assert_tws_exact(granularity, w1, w2, codes, alpha)
    assert torch.allclose(w1 + w2, weight, rtol=0, atol=4 * torch.finfo(dtype).eps * weight.abs().max())


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_tws_is_exact_in_float64_arithmetic(granularity):
    torch.manual_seed(3)
    weight = torch.randn(96, 80, dtype=torch.float64)
    w1, w2 = split_ternary_weight(weight, granularity)
    dims = dict(dim=1, keepdim=True) if granularity == "row" else dict()
    codes = ref.twn_codes(weight, ref.twn_threshold(weight, granularity))
    mask = codes != 0
    alpha_t = (weight.abs() * mask).sum(**dims) / mask.sum(**dims)
    alpha1, alpha2 = w1.abs().mean(**dims), w2.abs().mean(**dims)
    torch.testing.assert_close(alpha1, alpha2, rtol=1e-13, atol=0)
    torch.testing.assert_close(alpha1 + alpha2, alpha_t, rtol=1e-13, atol=0)


def test_tws_coefficients_match_the_hand_formulas():
    weight = torch.tensor([1.0, -0.9, 0.1, -0.2, 0.05, 0.6, -0.3, 0.0], dtype=torch.float64)
    n = 8
    delta = 0.7 * sum(abs(v) for v in weight.tolist()) / n
    in_i = [v for v in weight.tolist() if abs(v) > delta]
    in_j = [v for v in weight.tolist() if abs(v) <= delta and v >= 0]
    in_k = [v for v in weight.tolist() if abs(v) <= delta and v < 0]
    s_i, s_j, s_k = sum(map(abs, in_i)), sum(map(abs, in_j)), sum(map(abs, in_k))
    s_all = s_i + s_j + s_k
    a_expected = (s_i + s_k - s_j) / (2 * s_i)
    b_expected = ((n / len(in_i)) * s_i - s_all) / (2 * (len(in_j) + len(in_k)))
    a, b = tws_coefficients(weight)
    assert a.dtype == torch.float64 and b.dtype == torch.float64
    assert a.item() == pytest.approx(a_expected, rel=1e-15)
    assert b.item() == pytest.approx(b_expected, rel=1e-15)
    w1, w2 = split_ternary_weight(weight)
    for value, h1, h2 in zip(weight.tolist(), w1.tolist(), w2.tolist(), strict=True):
        if abs(value) > delta:
            assert (h1, h2) == pytest.approx((a_expected * value, (1 - a_expected) * value), rel=1e-15)
        elif value >= 0:
            assert (h1, h2) == pytest.approx((b_expected + value, -b_expected), rel=1e-15)
        else:
            assert (h1, h2) == pytest.approx((b_expected, value - b_expected), rel=1e-15)


def test_swapped_j_k_order_of_the_paper_is_not_exact():
    torch.manual_seed(5)
    weight = torch.randn(40, 50, dtype=torch.float64) + 0.05
    a, b = tws_coefficients(weight)
    codes = ref.twn_codes(weight, ref.twn_threshold(weight, "tensor"))
    zero = codes == 0
    s_i = (weight.abs() * (codes != 0)).sum()
    s_j = (weight.abs() * (zero & (weight >= 0))).sum()
    s_k = (weight.abs() * (zero & (weight < 0))).sum()
    assert a.item() == pytest.approx(((s_i + s_k - s_j) / (2 * s_i)).item(), rel=1e-15)
    assert abs(s_k - s_j) > 1e-3 * s_i
    swapped = (s_i + s_j - s_k) / (2 * s_i)
    w1 = torch.where(codes != 0, swapped * weight, torch.where(weight >= 0, b + weight, b))
    w2 = torch.where(codes != 0, (1 - swapped) * weight, torch.where(weight >= 0, -b, weight - b))
    assert not torch.allclose(w1.abs().mean(), w2.abs().mean(), rtol=1e-6)


def test_no_ternary_zeros_splits_in_halves():
    rows = torch.tensor([[0.5, -0.5, 0.5, -0.5], [1.0, -1.0, -1.0, 1.0]])
    for weight, granularity in ((rows[1:], "tensor"), (rows, "row")):
        a, b = tws_coefficients(weight, granularity)
        assert torch.all(a == 0.5) and torch.all(b == 0)
        w1, w2 = split_ternary_weight(weight, granularity)
        assert torch.equal(w1, weight / 2) and torch.equal(w2, weight / 2)
        assert torch.equal(_bwn_sum(w1, w2, granularity), ref.quantize_weight(weight, "twn", granularity))


def test_all_zero_weight_and_all_zero_rows_split_into_zeros():
    w1, w2 = split_ternary_weight(torch.zeros(4, 6))
    assert torch.equal(w1.abs(), torch.zeros(4, 6)) and torch.equal(w2.abs(), torch.zeros(4, 6))
    torch.manual_seed(0)
    weight = torch.randn(3, 16)
    weight[1] = 0
    w1, w2 = split_ternary_weight(weight, "row")
    assert torch.equal(w1[1].abs(), torch.zeros(16)) and torch.equal(w2[1].abs(), torch.zeros(16))
    assert torch.equal(_bwn_sum(w1, w2, "row")[1], torch.zeros(16))
    delta = ref.twn_threshold(weight, "row")
    _assert_tws_exact("row", w1, w2, ref.twn_codes(weight, delta), ref.twn_scale(weight, delta, "row"))


def test_exact_zero_latent_values_go_to_the_positive_zero_set():
    weight = torch.tensor([2.0, -2.0, 0.0, 0.0, 0.1, -0.1], dtype=torch.float64)
    a, b = tws_coefficients(weight)
    w1, w2 = split_ternary_weight(weight)
    assert b.item() > 0
    assert w1[2].item() == b.item() and w2[2].item() == -b.item()
    assert torch.equal(_bwn_sum(w1, w2, "tensor")[2:4], torch.zeros(2))


def test_infeasible_splits_raise_with_the_reason():
    weight = torch.cat([torch.tensor([10.0]), torch.full((100,), 0.12)])
    with pytest.raises(ValueError, match="needs 0 < a < 1"):
        split_ternary_weight(weight)
    torch.manual_seed(1)
    weight = torch.randn(8, 8)
    low_scale = weight.abs().mean() * 0.9
    with pytest.raises(ValueError, match="ternary scale is not above mean"):
        split_ternary_weight(weight, method="lat", scale=low_scale, threshold=low_scale / 2)
    rows = torch.randn(4, 8)
    # Row 2: I = {10} (delta = 0.7 * 20.5 / 8 = 1.79), S_J = 10.5 > S_I = 10, so a = -0.025.
    rows[2] = torch.cat([torch.tensor([10.0]), torch.full((7,), 1.5)])
    with pytest.raises(ValueError, match="1 scale group.*row 2 with a=-0.025"):
        split_ternary_weight(rows, "row")
    with pytest.raises(ValueError, match="4 scale group"):
        split_ternary_weight(rows, "row", scale=torch.full((4, 1), 0.1), threshold=torch.full((4, 1), 20.0))


def test_argument_errors():
    with pytest.raises(ValueError, match="method"):
        split_ternary_weight(torch.randn(3, 3), method="bwn")
    with pytest.raises(ValueError, match="together"):
        split_ternary_weight(torch.randn(3, 3), scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="granularity"):
        split_ternary_weight(torch.randn(3, 3), "column")
    with pytest.raises(ValueError, match="2-D"):
        split_ternary_weight(torch.randn(3, 3, 3), "row")
    with pytest.raises(TypeError, match="floating-point"):
        split_ternary_weight(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale must have 3 element"):
        split_ternary_weight(torch.randn(3, 3), "row", scale=torch.ones(2, 1), threshold=torch.ones(3, 1))
    with pytest.raises(ValueError, match="threshold must have 1 element"):
        split_ternary_weight(torch.randn(3, 3), scale=torch.tensor(1.0), threshold=torch.ones(3))


def test_meta_weights_give_meta_halves():
    w1, w2 = split_ternary_weight(torch.empty(5, 7, device="meta"))
    assert w1.is_meta and w2.shape == (5, 7)


def test_lat_weight_splits_against_its_own_scale():
    torch.manual_seed(2)
    weight = torch.randn(48, 40)
    moment = torch.rand(48, 40) ** 4
    for granularity in ("tensor", "row"):
        alpha, delta = ref.lat_scale_threshold(weight, moment, granularity)
        w1, w2 = split_ternary_weight(weight, granularity, method="lat", second_moment=moment)
        codes = ref.twn_codes(weight, delta)
        _assert_tws_exact(granularity, w1, w2, codes, alpha)
        twn_alpha = ref.twn_scale(weight, ref.twn_threshold(weight, granularity), granularity)
        assert not torch.allclose(alpha, twn_alpha, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Layers and models
# ---------------------------------------------------------------------------------------------------------------


def _ternary_layer(act_bits, granularity="tensor", weight_method="twn", seed=0):
    torch.manual_seed(seed)
    layer = triton_bq.TernaryLinear(24, 10, act_bits=act_bits, granularity=granularity,
                                    weight_method=weight_method, backend="reference")
    with torch.no_grad():
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("act_bits", [None, 8, 4], ids=["weight_only", "a8", "a4"])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_split_layer_matches_ternary_layer(act_bits, granularity):
    layer = _ternary_layer(act_bits, granularity)
    x = torch.randn(6, 24)
    expected = layer(x)
    split = split_ternary_to_binary(layer)
    assert isinstance(split, SplitBinaryLinear)
    assert split.weight_method == "bwn" and split.granularity == granularity
    assert torch.equal(split.bias1, layer.bias.detach() / 2) and torch.equal(split.bias2, layer.bias.detach() / 2)
    assert torch.equal(split.merged_bias(), layer.bias.detach())
    if act_bits is not None:
        q1, q2 = split.half1.act_quantizer, split.half2.act_quantizer
        for name, value in layer.act_quantizer.named_parameters():
            assert torch.equal(getattr(q1, name), value) and torch.equal(getattr(q2, name), value)
            assert getattr(q1, name) is not value and getattr(q1, name) is not getattr(q2, name)
    torch.testing.assert_close(split(x), expected, rtol=1e-5, atol=1e-6)
    q1, q2 = split.quantized_weights()
    _assert_close_to_ternary(q1 + q2, layer.quantized_weight(), layer.weight_scale_threshold()[0])


def test_empty_split_layers_load_a_split_state_dict():
    split = split_ternary_to_binary(_ternary_layer(8))
    empty = SplitBinaryLinear(24, 10, act_bits=8, backend="reference")
    empty.load_state_dict(split.state_dict(), strict=True)
    x = torch.randn(5, 24)
    assert torch.equal(empty(x), split(x))
    embedding = triton_bq.QuantEmbedding(20, 8, padding_idx=0, weight_method="twn")
    split_embedding = split_ternary_to_binary(embedding)
    empty_embedding = SplitBinaryEmbedding(20, 8, padding_idx=0)
    empty_embedding.load_state_dict(split_embedding.state_dict(), strict=True)
    ids = torch.tensor([[0, 3, 19], [7, 7, 1]])
    assert torch.equal(empty_embedding(ids), split_embedding(ids))
    with pytest.raises(TypeError, match="half2 must be a BinaryLinear"):
        SplitBinaryLinear.from_halves(split.half1, nn.Linear(24, 10))
    with pytest.raises(ValueError, match="same shape"):
        SplitBinaryLinear.from_halves(split.half1, triton_bq.BinaryLinear(24, 11))
    with pytest.raises(TypeError, match="weight_method='bwn'"):
        SplitBinaryEmbedding.from_halves(embedding, embedding)


def test_split_layer_trains_both_halves():
    split = split_ternary_to_binary(_ternary_layer(8))
    split.train()
    split(torch.randn(5, 24)).square().sum().backward()
    for parameter in (split.weight1, split.weight2, split.bias1, split.bias2, split.half1.act_quantizer.clip):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    torch.testing.assert_close(split.weight1.grad, split.weight2.grad)


def test_split_lat_layer_reproduces_the_lat_output_with_the_optimizer_moment():
    layer = _ternary_layer(8, weight_method="lat")
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    triton_bq.attach_optimizer(layer, optimizer)
    layer.train()
    layer(torch.randn(4, 24)).square().sum().backward()
    optimizer.step()
    layer.eval()
    x = torch.randn(6, 24)
    expected, reference_weight = layer(x), layer.quantized_weight()
    alpha = layer.weight_scale_threshold()[0]
    split = split_ternary_to_binary(layer)
    q1, q2 = split.quantized_weights()
    _assert_close_to_ternary(q1 + q2, reference_weight, alpha)
    torch.testing.assert_close(split(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("triton_bq.kernels.linear") is None,
                    reason="triton_bq.kernels.linear (the fused kernel) is not available")
def test_split_layer_fused_path_matches_reference():
    layer = _ternary_layer(8)
    split = split_ternary_to_binary(layer)
    x = torch.randn(7, 24)
    expected = split(x)
    for half in split.halves():
        half.backend = "triton"
    torch.testing.assert_close(split(x), expected, rtol=1e-5, atol=1e-5)


def ternary_bert(weight_method="twn", granularity="tensor", act_bits=8, seed=0, layers=2):
    model = tiny_bert(seed, num_hidden_layers=layers)
    config = triton_bq.QuantConfig(weight_method=weight_method, granularity=granularity, act_bits=act_bits,
                                   backend="reference")
    return triton_bq.quantize_(model, config)


def _ternary_weight(module):
    """``(T(w), alpha)`` of a ternary linear layer or embedding, as its forward computes them (float32)."""
    granularity = "row" if isinstance(module, triton_bq.QuantEmbedding) else module.granularity
    moment = triton_bq.nn.activation.second_moment_of(module) if module.weight_method == "lat" else None
    alpha, delta = ref.weight_scale_threshold(module.weight, module.weight_method, granularity, moment)
    return alpha * ref.twn_codes(module.weight, delta).float(), alpha


def _record_ternary_layers(model, inputs):
    """Run ``model``; return ``{name: (input, output, T(w), alpha)}`` of every ternary layer, and the outputs."""
    records, hooks = {}, []
    for name, module in model.named_modules():
        if is_ternary_module(module):
            def hook(module, args, output, name=name):
                records[name] = (args[0].detach().clone(), output.detach().clone(), *_ternary_weight(module))
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    for handle in hooks:
        handle.remove()
    return records, out


def _act_codes(layer, x):
    """Integer activation codes of ``x`` under ``layer``'s input quantizer, and ``x / step`` before rounding."""
    quantizer = layer.act_quantizer
    lo, hi, zero, step, qmin, qmax = ref.act_params(x, quantizer.method, quantizer.bits, clip=getattr(
        quantizer, "clip", None), step=getattr(quantizer, "step", None), signed=quantizer.signed)
    scaled = (torch.minimum(torch.maximum(x.float(), lo), hi) - zero) / step
    return torch.clamp(torch.round(scaled), qmin, qmax), scaled, step


def _matmul_error_bound(x, *weights):
    """Worst-case float32 error of ``x @ w.T`` summed over ``weights``: ``gamma_K * sum_k |x_k| |w_nk|`` each."""
    gamma = x.shape[-1] * EPS32 / (1 - x.shape[-1] * EPS32)
    return sum(gamma * (x.abs() @ w.abs().T) for w in weights)


def _assert_split_layer_matches_on_the_same_input(split, x, expected, ternary_weight, alpha):
    """The exact per-layer claim: same input -> same activation codes, so only the scales' ulps differ."""
    if isinstance(split, SplitBinaryLinear):
        q1, q2 = (q.float() for q in split.quantized_weights())
    else:
        q1, q2 = (ref.quantize_weight(half.weight.detach(), "bwn", "row").float() for half in split.halves())
    _assert_close_to_ternary(q1 + q2, ternary_weight, alpha)
    with torch.no_grad():
        actual = split(x)
    if isinstance(split, SplitBinaryEmbedding):
        # A lookup sums two float32 rows once: one rounding of the sum on top of the weight identity.
        bound = SCALE_TOL_EPS * EPS32 * alpha.max() + EPS32 * expected.abs()
        assert bool(((actual - expected).abs() <= bound).all())
        return
    if split.half1.act_quantizer is None:
        quantized_x = x.float()
    else:
        # Both halves quantize x with the ternary layer's clip: identical codes and step (checked, not assumed).
        codes1, _, step1 = _act_codes(split.half1, x)
        codes2, _, step2 = _act_codes(split.half2, x)
        assert torch.equal(codes1, codes2) and torch.equal(step1, step2)
        quantized_x = codes1 * step1
    # |Q(x)| @ |B1 + B2 - T|^T from the weight identity, plus the float32 rounding of the three matmuls and of
    # the sums (y1 + y2, and the biases).
    bound = (quantized_x.abs().sum(-1, keepdim=True) * SCALE_TOL_EPS * EPS32 * alpha.max()
             + _matmul_error_bound(quantized_x, ternary_weight, q1, q2) + 2 * EPS32 * expected.abs()
             + (0 if split.half1.bias is None else 2 * EPS32 * split.merged_bias().abs()))
    error = (actual - expected).abs()
    worst = error.argmax()
    assert bool((error <= bound).all()), f"error {float(error.flatten()[worst])}, bound {float(bound.flatten()[worst])}"


def _forced_inputs(model, records):
    """Forward pre-hooks that feed every split layer the input its ternary layer saw (no code can flip)."""
    modules = dict(model.named_modules())
    return [modules[name].register_forward_pre_hook(lambda module, args, x=record[0]: (x,))
            for name, record in records.items()]


@pytest.mark.parametrize(
    "weight_method, granularity, act_bits",
    [("twn", "tensor", 8), ("twn", "row", 8), ("twn", "tensor", 4), ("twn", "tensor", None), ("lat", "tensor", 8)],
)
def test_split_bert_matches_ternary_bert(weight_method, granularity, act_bits):
    model = ternary_bert(weight_method, granularity, act_bits)
    inputs = bert_inputs()
    records, expected = _record_ternary_layers(model, inputs)
    assert len(records) == 2 * 6 + 2  # 6 linear layers per block, the word embedding and the pooler
    split_ternary_to_binary(model)
    assert not any(is_ternary_module(module) for module in model.modules())
    assert isinstance(model.bert.embeddings.word_embeddings, SplitBinaryEmbedding)
    assert isinstance(model.bert.pooler.dense, SplitBinaryLinear)
    assert type(model.classifier) is nn.Linear
    modules = dict(model.named_modules())
    for name, (x, output, ternary_weight, alpha) in records.items():
        _assert_split_layer_matches_on_the_same_input(modules[name], x, output, ternary_weight, alpha)
    # End to end with every split layer fed its ternary layer's input: the codes cannot flip, so the assembly
    # (halved biases, embeddings, pooler, classifier) must reproduce the ternary model to float32 tolerance.
    hooks = _forced_inputs(model, records)
    with torch.no_grad():
        forced = model(**inputs, output_hidden_states=True)
    for handle in hooks:
        handle.remove()
    torch.testing.assert_close(forced.logits, expected.logits, rtol=1e-5, atol=1e-6)
    for split_hidden, ternary_hidden in zip(forced.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(split_hidden, ternary_hidden, rtol=1e-5, atol=2e-6)
    if act_bits is None:
        # Weight-only: nothing to flip, so the free-running split model matches as tightly.
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
        for split_hidden, ternary_hidden in zip(out.hidden_states, expected.hidden_states, strict=True):
            torch.testing.assert_close(split_hidden, ternary_hidden, rtol=1e-5, atol=2e-6)


def _record_inputs(model, inputs, names, layer_norms):
    """Run ``model``; return the inputs of the modules ``names`` and of the LayerNorms ``layer_norms``."""
    modules, records, hooks = dict(model.named_modules()), {}, []
    for name in [*names, *layer_norms]:
        def hook(module, args, name=name):
            records[name] = args[0].detach().clone()
        hooks.append(modules[name].register_forward_pre_hook(hook))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    for handle in hooks:
        handle.remove()
    return records, out


def test_free_running_split_bert_differs_only_by_activation_codes_flipped_at_ties():
    """Free-running at A8 the split model's activations differ from the ternary ones by float32 ulps, which can
    move an activation across a rounding tie (tws.py). Pin what that allows: a flipped code moves by exactly one,
    only where the ternary value sat within the input's own perturbation of a tie, and a hidden state moves by no
    more than its flipped codes move it through the output projection and the LayerNorm after it."""
    model = ternary_bert("twn", "tensor", 8)
    inputs = bert_inputs()
    blocks = range(len(model.bert.encoder.layer))
    names = [f"bert.encoder.layer.{block}.{site}" for block in blocks for site in
             ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")]
    layer_norms = [f"bert.encoder.layer.{block}.output.LayerNorm" for block in blocks]
    ternary_inputs, expected = _record_inputs(model, inputs, names, layer_norms)
    split_ternary_to_binary(model)
    split_inputs, out = _record_inputs(model, inputs, names, layer_norms)
    modules = dict(model.named_modules())
    torch.testing.assert_close(out.hidden_states[0], expected.hidden_states[0], rtol=1e-5, atol=2e-6)
    flips = {}
    for name in names:
        codes, scaled, _ = _act_codes(modules[name].half1, ternary_inputs[name])
        split_codes, split_scaled, _ = _act_codes(modules[name].half1, split_inputs[name])
        flipped = codes != split_codes
        assert bool(((codes - split_codes).abs() <= 1).all()), name
        if sum(flips.values()) == 0:
            # Before any flip the inputs differ by float32 ulps, so a flip can only sit that close to a tie.
            torch.testing.assert_close(split_inputs[name], ternary_inputs[name], rtol=1e-5, atol=2e-6)
            tie_distance = (scaled - scaled.floor() - 0.5).abs()
            assert bool((tie_distance[flipped] <= (scaled - split_scaled).abs()[flipped] + 8 * EPS32 * 127).all())
        flips[name] = int(flipped.sum())
    for block in blocks:
        hidden, ternary_hidden = out.hidden_states[block + 1], expected.hidden_states[block + 1]
        upstream = sum(flips[name] for name in names[:6 * block])
        in_block = {name: flips[name] for name in names[6 * block:6 * block + 6]}
        if upstream + sum(in_block.values()) == 0:
            torch.testing.assert_close(hidden, ternary_hidden, rtol=1e-5, atol=2e-6)
        elif upstream == 0 and sum(in_block.values()) == in_block[f"bert.encoder.layer.{block}.output.dense"]:
            # Flips only in this block's output projection (no mixing across tokens after it): token t's
            # pre-LayerNorm value moves by (Q_split(x) - Q(x)) @ T(w)^T, and the LayerNorm's Jacobian has norm
            # at most max|gamma| / std (its remainder is second order in move / std).
            name = f"bert.encoder.layer.{block}.output.dense"
            dense, layer_norm = modules[name].half1, modules[layer_norms[block]]
            codes, _, step = _act_codes(dense, ternary_inputs[name])
            split_codes, _, split_step = _act_codes(dense, split_inputs[name])
            ternary_weight = sum(q.float() for q in modules[name].quantized_weights())  # T(w) to a few ulps
            move = ((split_codes * split_step - codes * step) @ ternary_weight.T).norm(dim=-1)
            pre_norm = ternary_inputs[layer_norms[block]]
            std = (pre_norm.var(dim=-1, unbiased=False) + layer_norm.eps).sqrt()
            float_tolerance = (2e-6 + 1e-5 * ternary_hidden.abs()).norm(dim=-1)
            bound = layer_norm.weight.abs().max() / std * move * (1 + move / std) + float_tolerance
            error = (hidden - ternary_hidden).norm(dim=-1)
            assert bool((error <= bound).all()), (error, bound)
            assert bool((error[move == 0] <= float_tolerance[move == 0]).all())
        # After flips in an earlier block, the forced-input test above is what constrains the model.
    assert sum(flips.values()) <= 1e-3 * sum(ternary_inputs[name].numel() for name in names)


def test_split_embedding_is_exact_per_row():
    model = ternary_bert()
    embedding = model.bert.embeddings.word_embeddings
    ids = torch.arange(64).reshape(4, 16)
    expected = embedding(ids)
    table = embedding.weight.detach().clone()
    split_ternary_to_binary(model)
    split = model.bert.embeddings.word_embeddings
    delta = ref.twn_threshold(table, "row")
    _assert_close_to_ternary(split(ids), expected, ref.twn_scale(table, delta, "row"))
    _assert_tws_exact("row", split.weight1.detach(), split.weight2.detach(), ref.twn_codes(table, delta),
                      ref.twn_scale(table, delta, "row"))


def test_split_model_state_dict_round_trips_into_a_fresh_split_model():
    model = ternary_bert(act_bits=4)
    inputs = bert_inputs()
    model(**inputs)
    split_ternary_to_binary(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = split_ternary_to_binary(ternary_bert(seed=7, act_bits=4))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())), strict=True)
    assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)
    structure = ternary_bert(seed=7, act_bits=4)
    query = structure.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    split_ternary_to_binary(structure, initialize=False)
    halves = structure.bert.encoder.layer[0].attention.self.query
    assert torch.equal(halves.weight1, query / 2) and torch.equal(halves.weight2, query / 2)
    structure.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())), strict=True)
    assert torch.equal(structure(**inputs).logits, model(**inputs).logits)


def test_dequantize_turns_split_layers_into_two_full_precision_halves():
    model = split_ternary_to_binary(ternary_bert(act_bits=None))
    layer = model.bert.encoder.layer[0].intermediate.dense
    w1, w2 = layer.weight1.detach().clone(), layer.weight2.detach().clone()
    triton_bq.dequantize_(model)
    assert type(layer.half1) is nn.Linear and type(layer.half2) is nn.Linear
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ (w1 + w2).T + layer.merged_bias(), rtol=1e-5, atol=1e-6)


def test_split_candidates_group_the_paper_sites():
    model = ternary_bert()
    candidates = split_candidates(model)
    layer0 = "bert.encoder.layer.0"
    assert list(candidates)[:6] == ["bert.embeddings.word_embeddings", f"{layer0}:qk", f"{layer0}:v", f"{layer0}:o",
                                    f"{layer0}:ffn_in", f"{layer0}:ffn_out"]
    assert candidates[f"{layer0}:qk"] == [f"{layer0}.attention.self.query", f"{layer0}.attention.self.key"]
    assert candidates[f"{layer0}:o"] == [f"{layer0}.attention.output.dense"]
    assert candidates[f"{layer0}:ffn_out"] == [f"{layer0}.output.dense"]
    assert candidates["bert.pooler.dense"] == ["bert.pooler.dense"]
    assert len(candidates) == 2 + 2 * 5


def test_partial_split_binarizes_the_rest_on_the_same_parameters():
    model = ternary_bert()
    value = model.bert.encoder.layer[1].attention.self.value
    value_weight, value_quantizer = value.weight, value.act_quantizer
    query_weight = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    split_ternary_to_binary(model, include=["bert.encoder.layer.0:qk", "bert.pooler.dense"])
    layer0 = model.bert.encoder.layer[0].attention.self
    assert isinstance(layer0.query, SplitBinaryLinear) and isinstance(layer0.key, SplitBinaryLinear)
    assert isinstance(model.bert.pooler.dense, SplitBinaryLinear)
    assert type(layer0.value) is triton_bq.BinaryLinear
    binarized = model.bert.encoder.layer[1].attention.self.value
    assert type(binarized) is triton_bq.BinaryLinear
    assert binarized.weight is value_weight and binarized.act_quantizer is value_quantizer
    embedding = model.bert.embeddings.word_embeddings
    assert type(embedding) is triton_bq.QuantEmbedding and embedding.weight_method == "bwn"
    torch.testing.assert_close(layer0.query.weight1 + layer0.query.weight2, query_weight, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="neither"):
        split_ternary_to_binary(ternary_bert(), include=["bert.encoder.layer.0.nothing"])
    with pytest.raises(TypeError, match="string"):
        split_ternary_to_binary(ternary_bert(), include="bert.pooler.dense")


def test_split_costs_count_the_extra_binary_matrix_and_scales():
    model = ternary_bert()
    costs = split_costs(model)
    # The halves share the input quantizer (stored once). qk: 2 x (32*32/8 bytes + 1 fp32 scale);
    # ffn_in: 48 rows of 32 bits + 4; ffn_out: 32 rows of 48 bits padded to 2 int32 words + 4; embedding: 64*32/8 + 64*4
    assert costs["bert.encoder.layer.0:qk"] == 2 * (128 + 4)
    assert costs["bert.encoder.layer.0:ffn_in"] == 192 + 4
    assert costs["bert.encoder.layer.0:ffn_out"] == 32 * 8 + 4
    assert costs["bert.embeddings.word_embeddings"] == 256 + 256
    row = ternary_bert(granularity="row", act_bits=4)
    assert split_costs(row)["bert.encoder.layer.1:v"] == 128 + 4 * 32


def test_measure_split_sensitivity_compares_each_candidate_with_all_binary():
    ternary = ternary_bert(layers=1)
    inputs = bert_inputs()
    with torch.no_grad():
        target = ternary(**inputs).logits

    def evaluate(model):
        with torch.no_grad():
            return -float((model(**inputs).logits - target).square().mean())

    calls = []

    def factory():
        calls.append(1)
        return copy.deepcopy(ternary)

    gains = measure_split_sensitivity(factory, evaluate)
    candidates = split_candidates(ternary)
    assert list(gains) == list(candidates) and len(calls) == len(candidates) + 1
    baseline = evaluate(split_ternary_to_binary(copy.deepcopy(ternary), include=()))
    for key in ("bert.encoder.layer.0:ffn_in", "bert.pooler.dense"):
        manual = evaluate(split_ternary_to_binary(copy.deepcopy(ternary), include=candidates[key])) - baseline
        assert gains[key] == pytest.approx(manual, rel=1e-12, abs=1e-15)
    assert baseline < 0 and sum(gains.values()) > 0
    assert not any(isinstance(module, (SplitBinaryLinear, triton_bq.BinaryLinear)) for module in ternary.modules())


def _brute_force(values, sizes, budget):
    keys = list(values)
    best = 0.0
    for count in range(len(keys) + 1):
        for subset in itertools.combinations(keys, count):
            if sum(sizes[key] for key in subset) <= budget:
                best = max(best, sum(values[key] for key in subset))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_choose_splits_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    count = rng.randint(1, 10)
    values = {f"c{index}": rng.uniform(-0.2, 1.0) for index in range(count)}
    sizes = {key: rng.choice([0, 6, 12, 18, 30, 48, 96]) * rng.choice([1, 7]) for key in values}
    budget = rng.randint(0, sum(sizes.values()) + 10)
    chosen = choose_splits(values, sizes, budget)
    assert sum(sizes[key] for key in chosen) <= budget
    assert all(values[key] > 0 for key in chosen)
    assert sum(values[key] for key in chosen) == pytest.approx(_brute_force(values, sizes, budget), rel=1e-12)


def test_choose_splits_with_a_unit_fits_the_budget_and_is_optimal_for_rounded_sizes():
    values = {"a": 3.0, "b": 2.0, "c": 2.5}
    sizes = {"a": 1001, "b": 501, "c": 499}
    assert choose_splits(values, sizes, 1000) == {"b", "c"}
    assert choose_splits(values, sizes, 1500) == {"a", "c"}
    # In units of 100 bytes (rounded up) a, b, c weigh 11, 6, 5: b + c no longer fits 10 units, a + c not 15.
    assert choose_splits(values, sizes, 1000, unit=100) == {"c"}
    assert choose_splits(values, sizes, 1500, unit=100) == {"b", "c"}


def test_choose_splits_errors():
    with pytest.raises(ValueError, match="same keys"):
        choose_splits({"a": 1.0}, {"b": 1}, 10)
    with pytest.raises(TypeError, match="sizes"):
        choose_splits({"a": 1.0}, {"a": 1.5}, 10)
    with pytest.raises(ValueError, match=">= 0"):
        choose_splits({"a": 1.0}, {"a": -1}, 10)
    with pytest.raises(ValueError, match="budget"):
        choose_splits({"a": 1.0}, {"a": 1}, -1)
    with pytest.raises(ValueError, match="finite"):
        choose_splits({"a": float("nan")}, {"a": 1}, 1)
    with pytest.raises(ValueError, match="max_cells"):
        choose_splits({"a": 1.0, "b": 1.0}, {"a": 1, "b": 2}, 10**9)


def test_adaptive_split_end_to_end_on_bert():
    model = ternary_bert()
    sensitivities = {key: float(index + 1) for index, key in enumerate(split_candidates(model))}
    costs = split_costs(model)
    budget = costs["bert.encoder.layer.1:ffn_out"] + costs["bert.pooler.dense"]
    chosen = choose_splits(sensitivities, costs, budget)
    assert chosen == {"bert.encoder.layer.1:ffn_out", "bert.pooler.dense"}
    split_ternary_to_binary(model, include=chosen)
    assert isinstance(model.bert.encoder.layer[1].output.dense, SplitBinaryLinear)
    assert sum(isinstance(module, SplitBinaryLinear) for module in model.modules()) == 2
