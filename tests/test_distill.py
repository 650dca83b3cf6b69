"""Distillation losses against hand computations, and attention-score capture on small random BERTs."""

import math

import pytest
import torch
from tiny_bert import bert_inputs, tiny_bert

import triton_bq
from triton_bq.nn.attention import QuantSelfAttentionMixin
from triton_bq.recipe.distill import (
    DistillationLoss,
    attention_scores_loss,
    capture_attention_scores,
    distill_loss,
    hidden_states_loss,
    logits_loss,
    record_attention_scores,
    soft_cross_entropy,
)


def _mean_square(a, b, keep=None):
    """Plain-Python mean of (a - b)^2 over the elements where ``keep`` is true (all by default)."""
    flat_a, flat_b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    flat_keep = [True] * len(flat_a) if keep is None else keep.reshape(-1).tolist()
    terms = [(x - y) ** 2 for x, y, k in zip(flat_a, flat_b, flat_keep, strict=True) if k]
    return sum(terms) / len(terms)


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_hidden_states_loss_is_the_sum_of_per_layer_mse():
    torch.manual_seed(0)
    student = [torch.randn(2, 4, 3) for _ in range(3)]
    teacher = [torch.randn(2, 4, 3) for _ in range(3)]
    expected = sum(_mean_square(s, t) for s, t in zip(student, teacher, strict=True))
    assert hidden_states_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    keep = MASK[:, :, None].expand(2, 4, 3).bool()
    expected_masked = sum(_mean_square(s, t, keep) for s, t in zip(student, teacher, strict=True))
    loss = hidden_states_loss(student, teacher, MASK, mask_padding=True)
    assert loss.item() == pytest.approx(expected_masked, rel=1e-6)


def test_attention_scores_loss_zeroes_masked_keys_and_optionally_padded_queries():
    torch.manual_seed(1)
    student = [torch.randn(2, 2, 4, 4) for _ in range(2)]
    teacher = [torch.randn(2, 2, 4, 4) for _ in range(2)]
    key_keep = MASK.bool()[:, None, None, :].expand(2, 2, 4, 4)
    expected = 0.0
    for s, t in zip(student, teacher, strict=True):
        keep = key_keep.reshape(-1).tolist()
        zeroed_s = [x if k else 0.0 for x, k in zip(s.reshape(-1).tolist(), keep, strict=True)]
        zeroed_t = [x if k else 0.0 for x, k in zip(t.reshape(-1).tolist(), keep, strict=True)]
        expected += sum((x - y) ** 2 for x, y in zip(zeroed_s, zeroed_t, strict=True)) / len(zeroed_s)
    assert attention_scores_loss(student, teacher, MASK).item() == pytest.approx(expected, rel=1e-6)
    pair_keep = MASK.bool()[:, None, :, None] & MASK.bool()[:, None, None, :]
    pair_keep = pair_keep.expand(2, 2, 4, 4)
    expected_pairs = sum(_mean_square(s, t, pair_keep) for s, t in zip(student, teacher, strict=True))
    loss = attention_scores_loss(student, teacher, MASK, mask_padding=True)
    assert loss.item() == pytest.approx(expected_pairs, rel=1e-6)
    unmasked = sum(_mean_square(s, t) for s, t in zip(student, teacher, strict=True))
    assert attention_scores_loss(student, teacher).item() == pytest.approx(unmasked, rel=1e-6)


def test_soft_cross_entropy_matches_the_formula_with_temperature():
    student = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.1, -1.0]])
    teacher = torch.tensor([[0.5, 0.2, 1.0], [-1.0, 2.0, 0.0]])
    for temperature in (1.0, 2.0):
        expected = 0.0
        for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
            t_exp = [math.exp(v / temperature) for v in t_row]
            probs = [v / sum(t_exp) for v in t_exp]
            log_norm = math.log(sum(math.exp(v / temperature) for v in s_row))
            expected += -sum(p * (v / temperature - log_norm) for p, v in zip(probs, s_row, strict=True))
        expected /= 2
        assert soft_cross_entropy(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)
        assert logits_loss(student, teacher, temperature=temperature).item() == pytest.approx(expected, rel=1e-6)


def test_logits_loss_is_mse_for_regression():
    student, teacher = torch.tensor([[0.5], [2.0], [-1.0]]), torch.tensor([[1.0], [1.0], [0.0]])
    expected = (0.25 + 1.0 + 1.0) / 3
    assert logits_loss(student, teacher).item() == pytest.approx(expected)
    assert logits_loss(student.reshape(-1), teacher.reshape(-1), is_regression=True).item() == pytest.approx(expected)
    two_class = torch.tensor([[0.5, 1.0]])
    assert logits_loss(two_class, two_class, is_regression=True).item() == 0.0


def test_distill_loss_weights_and_parts():
    torch.manual_seed(2)
    hidden_s = [torch.randn(2, 4, 3, requires_grad=True) for _ in range(2)]
    hidden_t = [torch.randn(2, 4, 3) for _ in range(2)]
    scores_s = [torch.randn(2, 2, 4, 4, requires_grad=True)]
    scores_t = [torch.randn(2, 2, 4, 4)]
    student = dict(hidden_states=hidden_s, logits=torch.randn(2, 3, requires_grad=True))
    teacher = dict(hidden_states=hidden_t, logits=torch.randn(2, 3))
    loss, parts = distill_loss(student, teacher, scores_s, scores_t, MASK, hidden_weight=2.0, attention_weight=0.5,
                               logits_weight=3.0, temperature=2.0)
    hidden = hidden_states_loss(hidden_s, hidden_t)
    attention = attention_scores_loss(scores_s, scores_t, MASK)
    logits = soft_cross_entropy(student["logits"], teacher["logits"], 2.0)
    assert set(parts) == {"hidden", "attention", "logits"}
    assert parts["hidden"].item() == pytest.approx(hidden.item())
    assert parts["attention"].item() == pytest.approx(attention.item())
    assert parts["logits"].item() == pytest.approx(logits.item())
    assert loss.item() == pytest.approx(2.0 * hidden.item() + 0.5 * attention.item() + 3.0 * logits.item(), rel=1e-6)
    loss.backward()
    # d(w_h * sum_l mean((s_l - t_l)^2)) / ds_l = w_h * 2 (s_l - t_l) / numel, written out per term.
    for student_hidden, teacher_hidden in zip(hidden_s, hidden_t, strict=True):
        expected = 2.0 * 2 * (student_hidden - teacher_hidden).detach() / student_hidden.numel()
        torch.testing.assert_close(student_hidden.grad, expected, rtol=1e-5, atol=1e-7)
    keys = MASK.bool()[:, None, None, :].float()
    expected_scores = 0.5 * 2 * (scores_s[0] - scores_t[0]).detach() * keys / scores_s[0].numel()
    torch.testing.assert_close(scores_s[0].grad, expected_scores, rtol=1e-5, atol=1e-7)
    # Soft cross-entropy at temperature T: d/ds = (softmax(s / T) - softmax(t / T)) / (T * batch).
    soft = (torch.softmax(student["logits"].detach() / 2.0, -1) - torch.softmax(teacher["logits"] / 2.0, -1))
    torch.testing.assert_close(student["logits"].grad, 3.0 * soft / (2.0 * 2), rtol=1e-5, atol=1e-7)
    stage2, parts2 = DistillationLoss(0.0, 0.0, 1.0)(dict(logits=student["logits"]), dict(logits=teacher["logits"]))
    assert set(parts2) == {"logits"} and stage2.item() == pytest.approx(soft_cross_entropy(
        student["logits"], teacher["logits"]).item())


def test_distill_loss_errors():
    hidden = [torch.zeros(1, 2, 3)]
    with pytest.raises(ValueError, match="same non-zero number"):
        hidden_states_loss(hidden, hidden * 2)
    with pytest.raises(ValueError, match="shape"):
        hidden_states_loss(hidden, [torch.zeros(1, 2, 4)])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        hidden_states_loss(hidden, hidden, torch.ones(1, 3), mask_padding=True)
    with pytest.raises(ValueError, match="needs attention_mask"):
        attention_scores_loss([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 2)], mask_padding=True)
    with pytest.raises(ValueError, match="output_hidden_states"):
        distill_loss(dict(logits=torch.zeros(1, 2)), dict(logits=torch.zeros(1, 2)), attention_weight=0)
    with pytest.raises(ValueError, match="student_scores"):
        distill_loss(dict(hidden_states=hidden), dict(hidden_states=hidden), logits_weight=0)
    with pytest.raises(ValueError, match="non-zero"):
        DistillationLoss(0, 0, 0)
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_capture_on_a_full_precision_teacher_gives_the_hand_computed_scores_and_restores_it(attn_implementation):
    model = tiny_bert(attn_implementation=attn_implementation)
    inputs = bert_inputs()
    with torch.no_grad():
        before = model(**inputs, output_hidden_states=True)
        with capture_attention_scores(model) as recorder:
            inside = model(**inputs, output_hidden_states=True)
            scores = recorder.scores
    assert len(scores) == 2 and len(recorder) == 2
    torch.testing.assert_close(inside.logits, before.logits, rtol=1e-5, atol=1e-6)
    attention = model.bert.encoder.layer[0].attention.self
    assert type(attention).__name__ == "BertSelfAttention" and "scores" not in attention.__dict__
    hidden = before.hidden_states[0]
    heads, head_size = 4, 8
    query = (hidden @ attention.query.weight.T + attention.query.bias).view(3, 10, heads, head_size).transpose(1, 2)
    key = (hidden @ attention.key.weight.T + attention.key.bias).view(3, 10, heads, head_size).transpose(1, 2)
    expected = query @ key.transpose(-1, -2) / math.sqrt(head_size)
    expected = expected * inputs["attention_mask"][:, None, None, :]
    assert scores[0].shape == (3, 4, 10, 10)
    torch.testing.assert_close(scores[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(scores[1][0, :, :, 7:], torch.zeros(4, 10, 3))
    with pytest.raises(RuntimeError, match="closed"):
        _ = recorder.scores


def test_capture_on_a_quantized_student_keeps_its_quantizers_and_trains_through_the_scores():
    student = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig(weight_method="twn", backend="reference"))
    teacher = tiny_bert(seed=3)
    inputs = bert_inputs()
    loss_fn = DistillationLoss(hidden_weight=1.0, attention_weight=1.0, logits_weight=0.0)
    assert loss_fn.needs_hidden_states and loss_fn.needs_attention_scores
    student.train()
    with capture_attention_scores(student) as student_scores, capture_attention_scores(teacher) as teacher_scores:
        with torch.no_grad():
            teacher_outputs = teacher(**inputs, output_hidden_states=True)
        student_outputs = student(**inputs, output_hidden_states=True)
        loss, parts = loss_fn(student_outputs, teacher_outputs, student_scores.scores, teacher_scores.scores,
                              inputs["attention_mask"])
    assert set(parts) == {"hidden", "attention"}
    assert loss.item() == pytest.approx(parts["hidden"].item() + parts["attention"].item(), rel=1e-6)
    loss.backward()
    query = student.bert.encoder.layer[1].attention.self.query
    assert query.weight.grad is not None and query.weight.grad.abs().sum() > 0
    attention = student.bert.encoder.layer[0].attention.self
    assert isinstance(attention, QuantSelfAttentionMixin) and attention.query_quantizer is not None
    assert attention.record_scores is False and "scores" not in attention.__dict__
    assert type(teacher.bert.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"


def test_record_attention_scores_returns_the_modules_in_order():
    model = tiny_bert()
    modules = record_attention_scores(model)
    assert modules == [layer.attention.self for layer in model.bert.encoder.layer]
    model(**bert_inputs())
    assert all(module.scores.shape == (3, 4, 10, 10) for module in modules)
    with pytest.raises(ValueError, match="no BERT-style self-attention"):
        record_attention_scores(torch.nn.Linear(2, 2))
