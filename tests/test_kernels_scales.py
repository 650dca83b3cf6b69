"""Scale-reduction kernels (weight alpha / delta, activation fake-quant scalars) against the reference."""

import pytest
import torch
from triton_bq.kernels import _common, scales

from triton_bq import reference as ref

WEIGHT_SHAPES = {"n1-k1": (1, 1), "n33-k96": (33, 96), "n7-k130": (7, 130), "n300-k70": (300, 70)}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def test_poison_hook_fills_outputs_with_nan(device):
    assert torch.isnan(_common.new_output((3, 2), torch.float32, torch.device(device))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("method", ["bwn", "twn"])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES.values(), ids=WEIGHT_SHAPES.keys())
def test_weight_scales_match_reference(device, shape, method, granularity, dtype):
    torch.manual_seed(0)
    weight = torch.randn(shape, device=device).to(dtype)
    alpha, delta = scales.weight_scale_threshold(weight, method, granularity)
    expected_alpha, expected_delta = ref.weight_scale_threshold(weight, method, granularity)
    assert alpha.dtype == torch.float32 and alpha.shape == expected_alpha.shape
    torch.testing.assert_close(alpha, expected_alpha, rtol=1e-6, atol=0)
    if method == "bwn":
        assert delta is None
    else:
        assert delta.shape == expected_delta.shape
        torch.testing.assert_close(delta, expected_delta, rtol=1e-6, atol=0)


def test_weight_scales_of_non_contiguous_weight(device):
    torch.manual_seed(1)
    weight = torch.randn(96, 33, device=device).t()
    for granularity in ("tensor", "row"):
        alpha, delta = scales.weight_scale_threshold(weight, "twn", granularity)
        expected_alpha, expected_delta = ref.weight_scale_threshold(weight, "twn", granularity)
        torch.testing.assert_close(alpha, expected_alpha, rtol=1e-6, atol=0)
        torch.testing.assert_close(delta, expected_delta, rtol=1e-6, atol=0)


def test_twn_scale_is_zero_where_nothing_passes_the_threshold(device):
    weight = torch.zeros(4, 40, device=device)
    weight[1] = torch.linspace(-1, 1, 40, device=device)
    alpha, delta = scales.weight_scale_threshold(weight, "twn", "row")
    expected_alpha, expected_delta = ref.weight_scale_threshold(weight, "twn", "row")
    assert alpha[0].item() == 0 and alpha[2].item() == 0
    torch.testing.assert_close(alpha, expected_alpha, rtol=1e-6, atol=0)
    torch.testing.assert_close(delta, expected_delta, rtol=1e-6, atol=0)
    alpha, _ = scales.weight_scale_threshold(torch.zeros(3, 5, device=device), "twn", "tensor")
    assert alpha.item() == 0


CLIPS = {"clipping-both": (-1.5, 1.0), "wider-than-data": (-50.0, 60.0), "positive-window": (0.25, 2.0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", CLIPS.values(), ids=CLIPS.keys())
@pytest.mark.parametrize("method", ["sym", "asym"])
def test_act_params_equal_reference_exactly(device, method, clip, dtype):
    torch.manual_seed(2)
    x = (torch.randn(127, 96, device=device) * 2).to(dtype)
    clip_tensor = torch.tensor(clip, device=device)
    params, qmin, qmax = scales.act_params(x, method, 8, clip=clip_tensor)
    lo, hi, zero, step, expected_qmin, expected_qmax = ref.act_params(x, method, 8, clip=clip_tensor)
    # max / min are exact and the division is IEEE: the scalars match bit for bit.
    assert torch.equal(params.cpu(), torch.stack([lo, hi, zero, step]).float().cpu())
    assert (qmin, qmax) == (expected_qmin, expected_qmax)


def test_act_params_of_a_single_row_and_strided_input(device):
    torch.manual_seed(3)
    x = torch.randn(96, 7, device=device).t()
    clip = torch.tensor([-0.5, 0.75], device=device)
    params, _, _ = scales.act_params(x, "asym", 4, clip=clip)
    expected = torch.stack(ref.act_params(x, "asym", 4, clip=clip)[:4]).float()
    assert torch.equal(params.cpu(), expected.cpu())
    row = x[:1]
    params, _, _ = scales.act_params(row, "sym", 8, clip=clip)
    assert torch.equal(params.cpu(), torch.stack(ref.act_params(row, "sym", 8, clip=clip)[:4]).float().cpu())


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_lsq_params(device, signed):
    x = torch.randn(5, 8, device=device)
    step = torch.tensor(0.375, device=device, dtype=torch.bfloat16)
    params, qmin, qmax = scales.act_params(x, "lsq", 4, step=step, signed=signed)
    lo, hi, zero, expected_step, expected_qmin, expected_qmax = ref.act_params(x, "lsq", 4, step=step, signed=signed)
    assert params.tolist() == [float("-inf"), float("inf"), 0.0, 0.375]
    assert (qmin, qmax) == (expected_qmin, expected_qmax)


def test_scale_kernel_argument_errors(device):
    with pytest.raises(TypeError, match="weight must have dtype"):
        scales.weight_scale_threshold(torch.ones(2, 2, dtype=torch.float64, device=device), "bwn")
    with pytest.raises(ValueError, match="'lat'"):
        scales.weight_scale_threshold(torch.ones(2, 2, device=device), "lat")
    with pytest.raises(ValueError, match="act_clip"):
        scales.act_params(torch.ones(2, 2, device=device), "sym", 8, clip=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="act_step"):
        scales.act_params(torch.ones(2, 2, device=device), "lsq", 4)
