"""The recipe's defaults, pinned by value: each expected number is written here, never read from the package.

PACT clip [-2.5, 2.5] (TernaryBERT/BinaryBERT 8-bit activations), the TWN threshold 0.7 * mean|w|, the LSQ step
initialisation 2 * mean|x| / sqrt(Qp), three LAT alternations, and the pipeline's stage order and learning rates.
"""

import math

import pytest
import torch
from tiny_bert import tiny_bert

import triton_bq
from train import glue, options, stages
from triton_bq import reference as ref
from triton_bq.nn.activation import ActQuantizer


def _act_quantizers(model):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ActQuantizer)]


def test_quant_config_initializes_every_clip_to_plus_minus_two_and_a_half():
    model = triton_bq.quantize_(tiny_bert(0), triton_bq.QuantConfig(backend="reference"))
    quantizers = _act_quantizers(model)
    # 6 Linear inputs per block, Q, K, V and the probabilities per block, and the pooler.
    assert len(quantizers) == 2 * (6 + 4) + 1
    for name, quantizer in quantizers:
        assert quantizer.method in ("sym", "asym"), name
        assert quantizer.clip.tolist() == [-2.5, 2.5], name
    assert triton_bq.QuantConfig().clip_init == 2.5
    assert ActQuantizer(8).clip.tolist() == [-2.5, 2.5]
    assert triton_bq.BinaryLinear(4, 3, act_bits=8).act_quantizer.clip.tolist() == [-2.5, 2.5]


def test_the_default_clip_saturates_at_two_and_a_half():
    quantizer = ActQuantizer(8)
    x = torch.tensor([-4.0, -2.5, 0.0, 1.25, 3.0])
    # max |clamp(x)| = 2.5, so the step is 2.5 / 127 and +-2.5 are codes +-127.
    step = 2.5 / 127
    expected = [-127 * step, -127 * step, 0.0, round(1.25 / step) * step, 127 * step]
    torch.testing.assert_close(quantizer(x), torch.tensor(expected), rtol=0, atol=1e-7)


def test_default_act_methods_and_asymmetric_ffn_output_input():
    assert ActQuantizer(8).method == "sym" and ActQuantizer(4).method == "lsq" and ActQuantizer(2).method == "lsq"
    model = triton_bq.quantize_(tiny_bert(0), triton_bq.QuantConfig(backend="reference"))
    methods = {name: quantizer.method for name, quantizer in _act_quantizers(model)}
    assert methods["bert.encoder.layer.0.output.dense.act_quantizer"] == "asym"  # after GELU: non-negative
    assert methods["bert.encoder.layer.0.intermediate.dense.act_quantizer"] == "sym"
    assert methods["bert.encoder.layer.1.attention.self.probs_quantizer"] == "asym"


def test_twn_threshold_is_seven_tenths_of_the_mean_magnitude():
    # mean |w| = 1 exactly, so delta = 0.7: 0.6875 (below) is a zero, 0.71875 (above) is not.
    weight = torch.tensor([[0.6875, -0.71875, 1.59375, -1.0]])
    assert float(weight.abs().mean()) == 1.0
    assert float(ref.twn_threshold(weight)) == pytest.approx(0.7, rel=1e-7)
    scale, threshold = ref.weight_scale_threshold(weight, "twn")
    codes = ref.twn_codes(weight, threshold)
    assert codes.tolist() == [[0.0, -1.0, 1.0, -1.0]]
    assert float(scale) == pytest.approx((0.71875 + 1.59375 + 1.0) / 3, rel=1e-7)
    layer = triton_bq.TernaryLinear(4, 1, bias=False, backend="reference")
    with torch.no_grad():
        layer.weight.copy_(weight)
    expected = (0.71875 + 1.59375 + 1.0) / 3 * torch.tensor([[0.0, -1.0, 1.0, -1.0]])
    torch.testing.assert_close(layer.quantized_weight(), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("bits, signed, positive_levels", [(4, True, 7), (4, False, 15), (2, True, 1), (3, False, 7)])
def test_lsq_step_starts_at_twice_the_mean_magnitude_over_root_qp(bits, signed, positive_levels):
    torch.manual_seed(bits + 10 * signed)
    x = torch.randn(5, 16) if signed else torch.rand(5, 16)
    expected = 2 * sum(abs(v) for v in x.reshape(-1).tolist()) / x.numel() / math.sqrt(positive_levels)
    assert float(ref.lsq_init_step(x, bits, signed)) == pytest.approx(expected, rel=1e-6)
    quantizer = ActQuantizer(bits, "lsq", signed=signed)
    quantizer(x)
    assert float(quantizer.step.detach()) == pytest.approx(expected, rel=1e-6) and bool(quantizer.initialized)
    quantizer(10 * x)  # initialised once: a later batch does not move the step
    assert float(quantizer.step.detach()) == pytest.approx(expected, rel=1e-6)


def _lat_by_hand(w, d, iterations):
    """TernaryBERT's alternation written out in float64: TWN start, then alpha and codes ``iterations`` times."""
    mean = sum(abs(v) for v in w) / len(w)
    codes = [(v > 0.7 * mean) - (v < -0.7 * mean) for v in w]
    for _ in range(iterations):
        alpha = sum(abs(c * dv * v) for c, dv, v in zip(codes, d, w, strict=True)) / sum(
            abs(c * dv) for c, dv in zip(codes, d, strict=True))
        codes = [(v > alpha / 2) - (v < -alpha / 2) for v in w]
    return alpha


def test_lat_runs_three_alternations_by_default():
    torch.manual_seed(0)
    weight = torch.randn(1, 64, dtype=torch.float64)
    moment = torch.rand(1, 64, dtype=torch.float64) ** 4
    w, d = weight.reshape(-1).tolist(), (moment.sqrt() + 1e-8).reshape(-1).tolist()
    by_iterations = [_lat_by_hand(w, d, iterations) for iterations in (1, 2, 3, 4)]
    # The alternation has not converged after 1 or 2 rounds on this matrix: the default is visible in alpha.
    assert len({round(alpha, 9) for alpha in by_iterations[:3]}) == 3
    alpha, delta = ref.lat_scale_threshold(weight, moment)
    assert float(alpha) == pytest.approx(by_iterations[2], rel=1e-6)
    assert float(delta) == pytest.approx(by_iterations[2] / 2, rel=1e-6)
    layer_alpha, _ = ref.weight_scale_threshold(weight, "lat", "tensor", moment)
    assert float(layer_alpha) == pytest.approx(by_iterations[2], rel=1e-6)


def _plan(*argv):
    args = glue.parse_args(["--model_name_or_path", "unused", *argv])
    options.check_args(args)
    return args, stages.plan_stages(args)


def test_pipeline_learning_rate_defaults_and_multiplier():
    args, _ = _plan()
    assert (args.learning_rate, args.ternary_learning_rate, args.binary_learning_rate) == (1e-4, 1e-5, 5e-5)
    assert args.hidden_lr_multiplier == 2.5
    _, plan = _plan("--ternary_learning_rate", "2e-5", "--binary_learning_rate", "4e-5", "--hidden_lr_multiplier", "3")
    rates = {stage.name: stage.learning_rate for stage in plan}
    assert rates["ternary_a8_hidden"] == pytest.approx(6e-5) and rates["ternary_a8_logits"] == pytest.approx(2e-5)
    assert rates["binary_a8_hidden"] == pytest.approx(1.2e-4) and rates["binary_a8_logits"] == pytest.approx(4e-5)
    assert rates["bwn_a8_hidden"] == pytest.approx(1.2e-4) and rates["bwn_a8_logits"] == pytest.approx(4e-5)


def test_pipeline_stage_order_losses_and_starting_points():
    _, plan = _plan("--quant", "binary", "--act_bits", "4")
    table = [(stage.name, stage.kind, stage.weight_method, stage.loss, stage.init_from, stage.teacher, stage.bits)
             for stage in plan]
    assert table == [
        ("teacher", "teacher", None, "task", None, None, "32-32-32"),
        ("width", "width", None, "width", "teacher", "teacher", "32-32-32"),
        ("ternary_a4_hidden", "distill", "twn", "hidden", "width", "width", "2-2-4"),
        ("ternary_a4_logits", "distill", "twn", "logits", "ternary_a4_hidden", "width", "2-2-4"),
        ("tws_a4", "split", "bwn", None, "ternary_a4_logits", None, "1-1-4"),
        ("binary_a4_hidden", "distill", "bwn", "hidden", "tws_a4", "width", "1-1-4"),
        ("binary_a4_logits", "distill", "bwn", "logits", "binary_a4_hidden", "width", "1-1-4"),
        ("bwn_a4_hidden", "distill", "bwn", "hidden", "teacher", "teacher", "1-1-4"),
        ("bwn_a4_logits", "distill", "bwn", "logits", "bwn_a4_hidden", "teacher", "1-1-4"),
    ]
