"""Narrow students: head / FFN-neuron selection, exactness of the shrink, plans on saved models, sizes."""

import copy
import json
import math

import pytest
import torch
import transformers
from tiny_bert import CONFIG, bert_inputs, tiny_bert
from torch import nn

import triton_bq
from triton_bq.export.size import model_size_report_from_config
from triton_bq.recipe.width import bert_layers, kept_heads, shrink_width_, supports_width, taylor_importance, width_plan

HEAD_SIZE = 8


def test_plan_ranks_heads_and_neurons_by_their_weight_path_norms():
    model = tiny_bert()
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():
        # Head 3 carries the largest V/O norms, head 0 the next; neuron 40 and neuron 2 dominate the FFN.
        layer.attention.self.value.weight[3 * HEAD_SIZE : 4 * HEAD_SIZE] *= 10
        layer.attention.output.dense.weight[:, 0:HEAD_SIZE] *= 5
        layer.intermediate.dense.weight[40] *= 10
        layer.output.dense.weight[:, 2] *= 10
    plan = width_plan(model, 0.5)
    assert list(plan) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert plan["bert.encoder.layer.1"]["heads"] == [0, 3]
    neurons = plan["bert.encoder.layer.1"]["neurons"]
    assert {2, 40} <= set(neurons) and len(neurons) == 24
    assert plan == json.loads(json.dumps(plan))
    # By hand, for layer 0: ||W_V[h]||_F * ||W_O[:, h]||_F, the two largest.
    layer = model.bert.encoder.layer[0]
    value = layer.attention.self.value.weight.detach().reshape(4, HEAD_SIZE, 32)
    output = layer.attention.output.dense.weight.detach().reshape(32, 4, HEAD_SIZE)
    importance = [value[h].norm() * output[:, h].norm() for h in range(4)]
    assert plan["bert.encoder.layer.0"]["heads"] == sorted(sorted(range(4), key=lambda h: -importance[h])[:2])


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "ternary"])
def test_shrunk_model_equals_the_full_model_without_the_dropped_heads_and_neurons(quantized):
    full = tiny_bert()
    plan = width_plan(full, 0.5)
    narrow = copy.deepcopy(full)
    assert shrink_width_(narrow, plan) == plan
    masked = copy.deepcopy(full)
    with torch.no_grad():
        for name, layer in bert_layers(masked):
            for head in set(range(4)) - set(plan[name]["heads"]):
                layer.attention.output.dense.weight[:, head * HEAD_SIZE : (head + 1) * HEAD_SIZE] = 0
            for neuron in set(range(CONFIG["intermediate_size"])) - set(plan[name]["neurons"]):
                layer.output.dense.weight[:, neuron] = 0
    attention = narrow.bert.encoder.layer[0].attention
    assert attention.self.query.weight.shape == (16, 32) and attention.output.dense.weight.shape == (32, 16)
    assert narrow.bert.encoder.layer[0].intermediate.dense.weight.shape == (24, 32)
    assert narrow.bert.encoder.layer[0].output.dense.weight.shape == (32, 24)
    assert attention.self.num_attention_heads == 2
    if quantized:
        # Quantized after the shrink, the narrow model keeps working (TWN scales of the kept weights).
        config = triton_bq.QuantConfig(weight_method="twn", act_bits=None, quantize_attention=False,
                                       backend="reference")
        plain = copy.deepcopy(narrow)
        triton_bq.quantize_(narrow, config)
        # The quantized narrow model is the narrow model with TWN of the kept weights: alpha = mean |w| over
        # |w| > 0.7 mean |w| of each narrow matrix (per row for the word embedding), written out here.
        state = plain.state_dict()
        for name, module in narrow.named_modules():
            if isinstance(module, (triton_bq.TernaryLinear, triton_bq.QuantEmbedding)):
                weight = module.weight.detach()
                dims = dict(dim=1, keepdim=True) if isinstance(module, triton_bq.QuantEmbedding) else dict()
                delta = 0.7 * weight.abs().mean(**dims)
                kept = weight.abs() > delta
                alpha = (weight.abs() * kept).sum(**dims) / kept.sum(**dims)
                state[f"{name}.weight"] = alpha * torch.sign(weight) * kept
        plain.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(narrow(**bert_inputs()).logits, plain(**bert_inputs()).logits,
                                       rtol=1e-5, atol=1e-6)
        return
    with torch.no_grad():
        torch.testing.assert_close(narrow(**bert_inputs()).logits, masked(**bert_inputs()).logits, rtol=1e-5, atol=1e-6)


def test_a_saved_plan_rebuilds_the_narrow_model_for_its_state_dict():
    narrow = tiny_bert()
    plan = json.loads(json.dumps(shrink_width_(narrow, 0.5)))
    rebuilt = transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG)).eval()
    shrink_width_(rebuilt, plan)
    rebuilt.load_state_dict(narrow.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**bert_inputs()).logits, narrow(**bert_inputs()).logits)


def test_kept_heads_select_the_teachers_scores_in_model_order():
    teacher, student = tiny_bert(), tiny_bert()
    plan = shrink_width_(student, 0.5)
    heads = kept_heads(teacher, plan)
    with triton_bq.capture_attention_scores(teacher) as t, triton_bq.capture_attention_scores(student) as s:
        with torch.no_grad():
            teacher(**bert_inputs())
            student(**bert_inputs())
        for index, (student_scores, teacher_scores) in enumerate(zip(s.scores, t.scores, strict=True)):
            assert student_scores.shape[1] == 2
            # Layer 0 receives the same input in both models, so its kept heads' scores are equal.
            if index == 0:
                torch.testing.assert_close(student_scores, teacher_scores[:, heads[0]])
    assert kept_heads(student, plan) == heads


def test_narrow_split_binary_model_exports_and_reloads_packed(tmp_path):
    model = tiny_bert()
    shrink_width_(model, 0.5)
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="twn", backend="reference"))
    triton_bq.split_ternary_to_binary(model)
    model.eval()
    with torch.no_grad():
        expected = model(**bert_inputs()).logits
    triton_bq.save_packed(model, tmp_path)
    loaded = triton_bq.load_packed(tmp_path, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**bert_inputs()).logits, expected, rtol=1e-4, atol=1e-5)


def test_half_width_bert_base_sizes():
    """BERT-base: the binary model split from the half-width ternary one has as many weights as BERT-base."""
    config = transformers.BertConfig(num_labels=2)
    quant = triton_bq.QuantConfig(weight_method="twn")
    ternary = model_size_report_from_config(config, quant_config=quant, width=0.5)
    binary = model_size_report_from_config(config, quant_config=quant, split=True, width=0.5)
    full_binary = model_size_report_from_config(config, quant_config=triton_bq.QuantConfig(weight_method="bwn"))
    layers, pooler, embedding = 12 * (4 * 768 * 768 + 2 * 768 * 3072), 768 * 768, 30522 * 768
    # Heads and FFN neurons halve; the pooler and the word embedding keep their width (and are split too).
    assert ternary.components()["ternary weights"]["numel"] == layers // 2 + pooler + embedding
    assert binary.components()["binary weights"]["numel"] == layers + 2 * (pooler + embedding)
    assert full_binary.components()["binary weights"]["numel"] == layers + pooler + embedding
    # Stored bytes from the format's rules, not from a report: codes are 2 bits per ternary weight (1 bit per half
    # for the split pair: the same words) padded to whole int32 words along K, one float32 scale per matrix (per row
    # for the embedding; per half when split), and every other tensor in float32: the classifier (2 x 768),
    # position and token-type embeddings, biases (merged once for a split pair), LayerNorms and one clip pair per
    # input quantizer (6 Linear inputs and 4 attention quantizers per layer, the pooler; one per split pair).
    def code_bytes(rows, columns):
        return rows * math.ceil(2 * columns / 32) * 4

    per_layer = 3 * code_bytes(384, 768) + code_bytes(768, 384) + code_bytes(1536, 768) + code_bytes(768, 1536)
    codes = 12 * per_layer + code_bytes(768, 768) + code_bytes(30522, 768)
    scales = 12 * 6 + 1 + 30522
    biases = 12 * (3 * 384 + 768 + 1536 + 768) + 768 + 2
    others = 2 * 768 + (512 + 2) * 768 + biases + (12 * 2 + 1) * 2 * 768 + (12 * 10 + 1) * 2
    assert ternary.stored_bytes == codes + 4 * (scales + others)
    assert binary.stored_bytes == codes + 4 * (2 * scales + others)


def test_bad_widths_and_plans_are_named():
    model = tiny_bert()
    assert supports_width(model, 0.5) and supports_width(model, 0.25) and not supports_width(model, 0.3)
    for width in (0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="width"):
            supports_width(model, width)
    with pytest.raises(ValueError, match="width=0.3"):
        width_plan(model, 0.3)
    with pytest.raises(ValueError, match="width=0.5 does not apply to Sequential"):
        width_plan(nn.Sequential(nn.Linear(4, 4)), 0.5)
    plan = width_plan(model, 0.5)
    broken = copy.deepcopy(plan)
    broken["bert.encoder.layer.0"]["heads"] = [0, 4]
    with pytest.raises(ValueError, match=r"\['heads'\] must be distinct indices in \[0, 4\), got \[0, 4\]"):
        shrink_width_(copy.deepcopy(model), broken)
    with pytest.raises(ValueError, match="the plan names layers"):
        shrink_width_(copy.deepcopy(model), {"bert.encoder.layer.0": plan["bert.encoder.layer.0"]})


def test_taylor_importance_is_the_loss_derivative_of_scaling_a_head_or_neuron_out():
    model = tiny_bert().double()
    first, second = bert_inputs(1), bert_inputs(2)
    for inputs, labels in ((first, [0, 1, 1]), (second, [1, 0, 1])):
        inputs["labels"] = torch.tensor(labels)
    importance = taylor_importance(model, [first, second])
    layer = model.bert.encoder.layer[1]

    def loss_with(scale, columns, weight):
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[:, columns] *= scale
            loss = model(**first).loss + model(**second).loss
            weight.copy_(saved)
        return loss.item()

    step = 1e-6
    layer_importance = importance["bert.encoder.layer.1"]
    for head in range(4):
        columns = slice(head * HEAD_SIZE, (head + 1) * HEAD_SIZE)
        weight = layer.attention.output.dense.weight
        derivative = (loss_with(1 + step, columns, weight) - loss_with(1 - step, columns, weight)) / (2 * step)
        assert layer_importance["heads"][head].item() == pytest.approx(abs(derivative), rel=1e-5, abs=1e-9)
    for neuron in (0, 17, 47):
        weight = layer.output.dense.weight
        derivative = (loss_with(1 + step, neuron, weight) - loss_with(1 - step, neuron, weight)) / (2 * step)
        assert layer_importance["neurons"][neuron].item() == pytest.approx(abs(derivative), rel=1e-5, abs=1e-9)
    assert all(parameter.grad is None for parameter in model.parameters()) and not model.training
    plan = width_plan(model, 0.5, importance)
    ranked = layer_importance["heads"].argsort(descending=True)[:2]
    assert plan["bert.encoder.layer.1"]["heads"] == sorted(ranked.tolist())
    with pytest.raises(ValueError, match="empty"):
        taylor_importance(model, [])
    with pytest.raises(ValueError, match="must hold 4 head and 48 neuron values"):
        width_plan(model, 0.5, {name: {"heads": torch.ones(3), "neurons": torch.ones(48)} for name in importance})
