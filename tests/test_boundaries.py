"""Boundary cases the random tests almost never hit, with expected values written out by hand.

- the clipped STE passes the gradient where ``|w| <= 1``: ``|w| == 1`` exactly passes, the next float above does not;
- LSQ (Esser et al.): ``x / s == Qn`` or ``Qp`` exactly is saturated (no input gradient, step gradient ``Qn``/``Qp``);
- PACT: ``x == lo`` or ``hi`` exactly is clipped (the gradient goes to the clip, not to ``x``);
- attention scores: padded keys are masked (zero in the recorded scores, no weight in the loss), padded queries
  are kept unless ``mask_padding=True``.

Both backends run each case: the pure-PyTorch reference and the fused kernels (the Triton interpreter on CPU).
"""

import math

import pytest
import torch
from tiny_bert import bert_inputs, tiny_bert

from triton_bq import ops
from triton_bq.options import QuantOptions
from triton_bq.recipe.distill import attention_scores_loss, capture_attention_scores

BACKENDS = ["reference", "triton"]
# The float32 neighbours of 1.0 (a float64 nextafter would round back to 1.0 in a float32 tensor).
ONE_UP = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
ONE_DOWN = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))


def _grads(x, weight, options, backend, **tensors):
    """``(y, grad_x, grad_weight, grads of tensors)`` of ``sum(y * grad_y)`` with ``grad_y = 1``."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    leaves = {name: value.clone().requires_grad_() for name, value in tensors.items()}
    y = ops.quant_linear(x, weight, None, options, backend=backend, **leaves)
    y.sum().backward()
    return y.detach(), x.grad, weight.grad, {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_ste_passes_the_gradient_at_magnitude_exactly_one(backend):
    # Row 0 holds +-1 exactly, row 1 the floats just outside, row 2 just inside, row 3 far inside / outside.
    weight = torch.tensor([
        [1.0, -1.0, 1.0, -1.0],
        [ONE_UP, -ONE_UP, ONE_UP, -ONE_UP],
        [ONE_DOWN, -ONE_DOWN, ONE_DOWN, -ONE_DOWN],
        [0.25, -3.0, 2.0, -0.5],
    ])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]])
    options = QuantOptions("bwn", "tensor", "clipped")
    _, _, grad_weight, _ = _grads(x, weight, options, backend)
    # grad_y = 1: dL/dw_q[n, k] = sum_m x[m, k] = [0, 2.5, 3, 6] for every row; the STE keeps it where |w| <= 1.
    column_sums = [0.0, 2.5, 3.0, 6.0]
    passes = [[True] * 4, [False] * 4, [True] * 4, [True, False, False, True]]
    expected = torch.tensor([[s if keep else 0.0 for s, keep in zip(column_sums, row, strict=True)]
                             for row in passes])
    assert torch.equal(grad_weight, expected)
    _, _, identity_grad, _ = _grads(x, weight, QuantOptions("bwn", "tensor", "identity"), backend)
    assert torch.equal(identity_grad, torch.tensor([column_sums] * 4))


def _float32_toward_zero(value):
    return float(torch.nextafter(torch.tensor(value), torch.tensor(0.0)))


def _lsq_case(bits, signed):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    step = 0.25  # a power of two: x / step is exact, so the codes below are exactly Qn, Qp and their neighbours
    values = [qmin, qmax, qmin + 0.5, qmax - 0.5, qmax + 3, qmin - 2, 1.25, qmax - 0.25]
    return qmin, qmax, step, torch.tensor([values]) * step


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lsq_at_exactly_qn_and_qp_is_saturated(backend, signed):
    bits = 4
    qmin, qmax, step, x = _lsq_case(bits, signed)
    weight = torch.ones(3, x.shape[1])  # BWN of all ones is all ones: y = sum_k Q(x)_k
    options = QuantOptions("bwn", act_method="lsq", act_bits=bits, act_signed=signed)
    y, grad_x, _, grads = _grads(x, weight, options, backend, act_step=torch.tensor(step))
    v = [value / step for value in x.reshape(-1).tolist()]
    # Round half to even (torch.round and the kernels), clamped to [Qn, Qp].
    codes = [min(max(float(round(value)), qmin), qmax) for value in v]
    torch.testing.assert_close(y, torch.full((1, 3), sum(codes) * step), rtol=0, atol=0)
    inside = [qmin < value < qmax for value in v]
    assert inside[:2] == [False, False] and inside[2:4] == [True, True]
    # dL/dQ(x)_k = 3 (three outputs): the input gradient passes strictly inside (Qn, Qp) only.
    assert grad_x.reshape(-1).tolist() == [3.0 if keep else 0.0 for keep in inside]
    local = [qmin if value <= qmin else qmax if value >= qmax else round(value) - value for value in v]
    expected_step = 3 * sum(local) / math.sqrt(x.numel() * qmax)
    assert float(grads["act_step"]) == pytest.approx(expected_step, rel=1e-6, abs=1e-7)
    assert math.copysign(1.0, float(grads["act_step"])) == math.copysign(1.0, expected_step)


@pytest.mark.parametrize("method", ["sym", "asym"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pact_input_exactly_at_the_clip_goes_to_the_clip(backend, method):
    lo, hi = -2.0, 1.5
    x = torch.tensor([[lo, hi, 0.5, -1.0, 3.0, -2.5, _float32_toward_zero(hi), _float32_toward_zero(lo)]])
    weight = torch.ones(2, x.shape[1])
    options = QuantOptions("bwn", act_method=method, act_bits=8)
    _, grad_x, _, grads = _grads(x, weight, options, backend, act_clip=torch.tensor([lo, hi]))
    values = x.reshape(-1).tolist()
    # dL/dQ(x)_k = 2 (two outputs); PACT: below (x <= lo) feeds clip[0], above (x >= hi) clip[1], the rest x.
    below, above = [value <= lo for value in values], [value >= hi for value in values]
    assert below[:2] == [True, False] and above[:2] == [False, True] and not below[6] and not above[7]
    assert grad_x.reshape(-1).tolist() == [0.0 if b or a else 2.0 for b, a in zip(below, above, strict=True)]
    assert grads["act_clip"].tolist() == [2.0 * sum(below), 2.0 * sum(above)]


def _scores_by_hand(model, hidden, layer, mask):
    """Pre-softmax ``Q K^T / sqrt(d)`` of one layer from its Linear weights, masked key columns set to zero."""
    attention = model.bert.encoder.layer[layer].attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def project(linear):
        return (hidden @ linear.weight.T + linear.bias).reshape(*hidden.shape[:2], heads, size).transpose(1, 2)

    scores = project(attention.query) @ project(attention.key).transpose(-1, -2) / math.sqrt(size)
    return scores * mask[:, None, None, :].to(scores.dtype)


def test_recorded_attention_scores_mask_keys_not_queries():
    model, inputs = tiny_bert(3), bert_inputs(4)
    mask = inputs["attention_mask"]
    with capture_attention_scores(model) as recorder, torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        scores = [score.clone() for score in recorder.scores]
    for layer, recorded in enumerate(scores):
        expected = _scores_by_hand(model, out.hidden_states[layer], layer, mask)
        torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-6)
        # Padded keys are exactly zero; padded query rows (e.g. row 9 of sequence 0) keep their real-key scores.
        assert bool((recorded[0, :, :, 7:] == 0).all()) and bool((recorded[2, :, :, 4:] == 0).all())
        assert bool((recorded[0, :, 9, :7] != 0).all()) and bool((recorded[2, :, 6, :4] != 0).all())


def test_attention_loss_ignores_padded_keys_and_drops_padded_queries_only_when_asked():
    torch.manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    teacher = [torch.randn(2, 3, 5, 5)]
    student = [teacher[0].clone()]
    # Anything at a padded key (sequence 0, keys 3 and 4) costs nothing.
    student[0][0, :, :, 3:] += 7.0
    assert float(attention_scores_loss(student, teacher, mask)) == 0.0
    assert float(attention_scores_loss(student, teacher, mask, mask_padding=True)) == 0.0
    # A padded query row's real keys (sequence 0, query 4, keys 0..2): counted by default, dropped by mask_padding.
    student[0][0, :, 4, :3] += 1.0
    # 9 squared unit differences over all 2 * 3 * 5 * 5 elements.
    assert float(attention_scores_loss(student, teacher, mask)) == pytest.approx(9 / 150, rel=1e-6)
    assert float(attention_scores_loss(student, teacher, mask, mask_padding=True)) == 0.0
    # A real (query, key) pair: counted both ways; mask_padding averages over 3 heads * (3^2 + 5^2) real pairs.
    student[0][1, 0, 2, 4] += 2.0
    assert float(attention_scores_loss(student, teacher, mask)) == pytest.approx((9 + 4) / 150, rel=1e-6)
    assert float(attention_scores_loss(student, teacher, mask, mask_padding=True)) == pytest.approx(
        4 / (3 * (9 + 25)), rel=1e-6)
