"""Reference quantizers: exact hand-computed cases, independent formulas, straight-through gradients."""

import math

import pytest
import torch

from triton_bq import reference as ref
from triton_bq.options import QuantOptions


def test_bwn_hand_computed_tensor_and_row():
    w = torch.tensor([[0.5, -1.0], [0.0, 2.5]])
    assert torch.equal(ref.bwn_codes(w), torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    assert ref.bwn_scale(w).item() == 1.0
    assert torch.equal(ref.bwn_scale(w, "row"), torch.tensor([[0.75], [1.25]]))
    wq = ref.quantize_weight(w, "bwn")
    assert torch.equal(wq, torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    wq_row = ref.quantize_weight(w, "bwn", "row")
    assert torch.equal(wq_row, torch.tensor([[0.75, -0.75], [1.25, 1.25]]))


def test_bwn_sign_of_zero_is_plus_one_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        w = torch.tensor([0.0, -0.0, 0.25, -0.25], dtype=dtype)
        codes = ref.bwn_codes(w)
        assert codes.dtype == dtype
        assert codes.tolist() == [1.0, 1.0, 1.0, -1.0]


def test_twn_hand_computed():
    w = torch.tensor([1.0, -0.2, 0.1, -2.0, 0.3, 0.0])
    delta = ref.twn_threshold(w)
    assert delta.item() == pytest.approx(0.7 * 0.6, rel=1e-6)
    assert torch.equal(ref.twn_codes(w, delta), torch.tensor([1.0, 0.0, 0.0, -1.0, 0.0, 0.0]))
    assert ref.twn_scale(w, delta).item() == pytest.approx(1.5, rel=1e-6)
    assert torch.allclose(ref.quantize_weight(w, "twn"), torch.tensor([1.5, 0.0, 0.0, -1.5, 0.0, 0.0]))


def test_twn_row_and_all_zero_rows():
    w = torch.tensor([[1.0, -0.2, 0.1, -2.0, 0.3, 0.0], [0.0] * 6])
    delta = ref.twn_threshold(w, "row")
    alpha = ref.twn_scale(w, delta, "row")
    assert alpha.shape == (2, 1)
    assert alpha[0, 0].item() == pytest.approx(1.5, rel=1e-6)
    assert alpha[1, 0].item() == 0.0
    wq = ref.quantize_weight(w, "twn", "row")
    assert torch.equal(wq[1], torch.zeros(6))
    assert not torch.isnan(wq).any()


def test_twn_threshold_is_strict():
    # An element exactly at +-delta maps to 0: the comparison is strict, in float32.
    w = torch.tensor([0.7, -0.7, 0.70001, -0.70001])
    assert ref.twn_codes(w, torch.tensor(0.7)).tolist() == [0.0, 0.0, 1.0, -1.0]


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_twn_matches_independent_loop(granularity):
    torch.manual_seed(0)
    w = torch.randn(7, 33, dtype=torch.float64)
    rows = [w] if granularity == "tensor" else list(w)
    expected = []
    for row in rows:
        values = row.flatten().tolist()
        mean = sum(abs(v) for v in values) / len(values)
        delta = 0.7 * mean
        kept = [abs(v) for v in values if abs(v) > delta]
        alpha = sum(kept) / len(kept)
        expected.append([alpha * ((v > delta) - (v < -delta)) for v in values])
    got = ref.quantize_weight(w, "twn", granularity).reshape(len(rows), -1)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_lat_hand_computed_with_second_moment():
    w = torch.tensor([1.0, -0.2, 0.1, -2.0, 0.3, 0.0])
    moment = torch.tensor([1.0, 1.0, 1.0, 9.0, 1.0, 1.0])
    alpha, delta = ref.lat_scale_threshold(w, moment)
    # codes stay [1, 0, 0, -1, 0, 0]; alpha = (1*1 + 3*2) / (1 + 3)
    assert alpha.item() == pytest.approx(1.75, rel=1e-6)
    assert delta.item() == pytest.approx(0.875, rel=1e-6)
    alpha_plain, _ = ref.lat_scale_threshold(w, None)
    assert alpha_plain.item() == pytest.approx(1.5, rel=1e-6)


def test_lat_iteration_moves_the_threshold():
    # TWN (delta = 0.7 * 0.9875) keeps {3, -3, 1.0, 0.9}: alpha = 1.975. Without a second moment (D = 1) each
    # LAT round re-thresholds at alpha / 2: 0.9 drops (alpha = 7/3), then 1.0 drops (alpha = 3), then stable.
    w = torch.tensor([3.0, -3.0, 1.0, 0.9, 0.0, 0.0, 0.0, 0.0])
    alpha, delta = ref.lat_scale_threshold(w, None, iterations=1)
    assert alpha.item() == pytest.approx(1.975, rel=1e-6)
    assert ref.twn_codes(w, delta).tolist() == [1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    alpha, delta = ref.lat_scale_threshold(w, None, iterations=3)
    assert alpha.item() == pytest.approx(3.0, rel=1e-6)
    assert ref.twn_codes(w, delta).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # A large second moment on the small weights pulls alpha down and keeps them: (3 + 3 + 100 + 90) / 202.
    moment = torch.tensor([1.0, 1.0, 1e4, 1e4, 1.0, 1.0, 1.0, 1.0])
    alpha, delta = ref.lat_scale_threshold(w, moment, iterations=3)
    assert alpha.item() == pytest.approx(196 / 202, rel=1e-6)
    assert ref.twn_codes(w, delta).tolist() == [1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_lat_rejects_bad_moment_shape_and_iterations():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="second_moment shape"):
        ref.lat_scale_threshold(w, torch.ones(3))
    with pytest.raises(ValueError, match="iterations"):
        ref.lat_scale_threshold(w, None, iterations=0)


@pytest.mark.parametrize("method", ["bwn", "twn"])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_weight_ste_gradients(method, ste):
    torch.manual_seed(1)
    w = (torch.randn(5, 9, dtype=torch.float64) * 1.5).requires_grad_()
    upstream = torch.randn(5, 9, dtype=torch.float64)
    ref.quantize_weight(w, method, ste=ste).backward(upstream)
    expected = upstream if ste == "identity" else upstream * (w.detach().abs() <= 1)
    assert torch.equal(w.grad, expected)


def test_sym_act_hand_computed():
    x = torch.tensor([0.5, -3.0, 1.0, 2.0])
    clip = torch.tensor([-2.5, 2.5])
    out = ref.quantize_act(x, "sym", 8, clip=clip)
    step = torch.tensor(2.5) / 127
    expected = torch.tensor([25.0, -127.0, 51.0, 102.0]) * step
    assert torch.equal(out, expected)


def test_asym_act_hand_computed():
    x = torch.tensor([0.0, 0.25, 1.0, 0.6])
    out = ref.quantize_act(x, "asym", 2, clip=torch.tensor([-2.5, 2.5]))
    # zero=0, step=1/3: q = round([0, .75, 3, 1.8]) = [0, 1, 3, 2]
    step = torch.tensor(1.0) / 3
    assert torch.equal(out, torch.tensor([0.0, 1.0, 3.0, 2.0]) * step)


def test_lsq_hand_computed_signed_and_unsigned():
    x = torch.tensor([-10.0, -0.26, 0.24, 0.5, 10.0])
    step = torch.tensor(0.5)
    out = ref.quantize_act(x, "lsq", 4, step=step)
    assert torch.equal(out, torch.tensor([-8.0, -1.0, 0.0, 1.0, 7.0]) * 0.5)
    out_unsigned = ref.quantize_act(x, "lsq", 4, step=step, signed=False)
    assert torch.equal(out_unsigned, torch.tensor([0.0, 0.0, 0.0, 1.0, 15.0]) * 0.5)


def test_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    out = ref.quantize_act(x, "lsq", 8, step=torch.tensor(1.0))
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_act_all_zero_input_gives_zero_not_nan():
    x = torch.zeros(3, 4)
    for method in ("sym", "asym"):
        out = ref.quantize_act(x, method, 8, clip=torch.tensor([-2.5, 2.5]))
        assert torch.equal(out, x)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sym_matches_independent_numpy_formula(bits):
    torch.manual_seed(bits)
    x = torch.randn(64) * 2
    clip = torch.tensor([-1.7, 2.1])
    qmax = 2 ** (bits - 1) - 1
    xc = x.clamp(-1.7, 2.1).numpy()
    step = abs(xc).max() / qmax
    import numpy as np

    expected = np.clip(np.rint(xc / step), -qmax, qmax) * step
    out = ref.quantize_act(x, "sym", bits, clip=clip)
    assert torch.allclose(out, torch.from_numpy(expected).float(), rtol=0, atol=1e-6)


def test_pact_clip_gradients():
    torch.manual_seed(2)
    x = (torch.randn(200, dtype=torch.float64) * 3).requires_grad_()
    clip = torch.tensor([-2.0, 1.5], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(200, dtype=torch.float64)
    for method in ("sym", "asym"):
        x.grad, clip.grad = None, None
        ref.quantize_act(x, method, 8, clip=clip).backward(upstream)
        xd = x.detach()
        inside = (xd > -2.0) & (xd < 1.5)
        assert torch.equal(x.grad, upstream * inside)
        expected = torch.stack([upstream[xd <= -2.0].sum(), upstream[xd >= 1.5].sum()])
        assert torch.allclose(clip.grad, expected, rtol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_match_esser_formulation(bits, signed):
    """Autograd through the textbook LSQ graph (clamp, round with STE, gradient-scaled step) on float64."""
    torch.manual_seed(bits + 10 * signed)
    x = (torch.randn(300, dtype=torch.float64) * 2).requires_grad_()
    step = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(300, dtype=torch.float64)
    ref.quantize_act(x, "lsq", bits, step=step, signed=signed).backward(upstream)

    qmin, qmax = ref.act_qrange("lsq", bits, signed)
    x2 = x.detach().clone().requires_grad_()
    s2 = step.detach().clone().requires_grad_()
    g = 1.0 / math.sqrt(x2.numel() * qmax)
    s_scaled = (s2 - s2 * g).detach() + s2 * g
    v = torch.clamp(x2 / s_scaled, qmin, qmax)
    v = (torch.round(v) - v).detach() + v
    (v * s_scaled).backward(upstream)
    assert torch.allclose(x.grad, x2.grad, rtol=0, atol=1e-12)
    assert torch.allclose(step.grad, s2.grad, rtol=1e-5)


def test_lsq_init_step():
    x = torch.tensor([1.0, -3.0, 2.0, 0.0])
    assert ref.lsq_init_step(x, 4).item() == pytest.approx(2 * 1.5 / math.sqrt(7), rel=1e-6)
    assert ref.lsq_init_step(x, 4, signed=False).item() == pytest.approx(2 * 1.5 / math.sqrt(15), rel=1e-6)


def test_quant_linear_composes_quantizers():
    torch.manual_seed(3)
    x = torch.randn(6, 10)
    w = torch.randn(4, 10)
    b = torch.randn(4)
    clip = torch.tensor([-2.5, 2.5])
    y = ref.quant_linear(x, w, b, QuantOptions("twn", act_method="sym", act_bits=8), act_clip=clip)
    expected = torch.nn.functional.linear(
        ref.quantize_act(x, "sym", 8, clip=clip), ref.quantize_weight(w, "twn"), b
    )
    assert torch.equal(y, expected)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ref.quantize_weight(torch.randn(3, 3), "xnor"), "weight_method"),
        (lambda: ref.quantize_weight(torch.randn(3, 3), "bwn", "column"), "granularity"),
        (lambda: ref.quantize_weight(torch.randn(3, 3), "bwn", ste="tanh"), "ste"),
        (lambda: ref.quantize_weight(torch.randn(3), "bwn", "row"), "2-D"),
        (lambda: ref.quantize_act(torch.randn(3), "sym", 9, clip=torch.tensor([-1.0, 1.0])), "act_bits"),
        (lambda: ref.quantize_act(torch.randn(3), "sym", 8), "act_clip"),
        (lambda: ref.quantize_act(torch.randn(3), "lsq", 4), "act_step"),
        (lambda: ref.quantize_act(torch.randn(3), "minmax", 8), "act_method"),
    ],
    ids=["method", "granularity", "ste", "row-needs-2d", "bits", "clip", "step", "act-method"],
)
def test_bad_arguments_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
