"""Module swap on Hugging Face models (random init, no download): BERT with attention quantization, ViT, GPT-Neo."""

import pytest
import torch
import transformers
from tiny_bert import bert_inputs, tiny_bert
from torch import nn

import triton_bq
from triton_bq.nn.attention import QuantSelfAttentionMixin, quantize_attention


def test_disabled_quantization_keeps_outputs_identical():
    model = tiny_bert()
    inputs = bert_inputs()
    expected = model(**inputs).logits
    config = triton_bq.QuantConfig(weight_method=None, embedding_method=None, act_bits=None, backend="reference")
    triton_bq.quantize_(model, config)
    for module in model.modules():
        if type(module).__name__ == "BertSelfAttention":
            quantize_attention(module, act_bits=None)
    assert sum(isinstance(m, triton_bq.QuantLinear) for m in model.modules()) == 2 * 6 + 1
    assert sum(isinstance(m, QuantSelfAttentionMixin) for m in model.modules()) == 2
    assert torch.equal(model(**inputs).logits, expected)


def test_binary_swap_covers_the_paper_sites_and_keeps_the_head():
    model = tiny_bert()
    inputs = bert_inputs()
    expected = model(**inputs).logits
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="bwn", act_bits=8, backend="reference"))
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    quantized = {name for name, module in linears.items() if isinstance(module, triton_bq.BinaryLinear)}
    assert set(linears) - quantized == {"classifier"}
    assert "bert.pooler.dense" in quantized
    assert isinstance(model.bert.embeddings.word_embeddings, triton_bq.QuantEmbedding)
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding
    assert type(model.bert.embeddings.token_type_embeddings) is nn.Embedding
    ffn_out = model.bert.encoder.layer[0].output.dense
    attention_out = model.bert.encoder.layer[0].attention.output.dense
    assert ffn_out.act_quantizer.method == "asym"
    assert attention_out.act_quantizer.method == "sym"
    attention = model.bert.encoder.layer[1].attention.self
    assert isinstance(attention, QuantSelfAttentionMixin)
    assert attention.probs_quantizer.method == "asym" and attention.query_quantizer.method == "sym"
    out = model(**inputs).logits
    assert out.shape == expected.shape and not torch.allclose(out, expected)


def test_ternary_a4_swap_uses_lsq_everywhere():
    model = tiny_bert()
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="twn", act_bits=4, backend="reference"))
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, triton_bq.TernaryLinear)
    assert layer.intermediate.dense.act_quantizer.method == "lsq"
    assert layer.attention.self.probs_quantizer.method == "lsq"
    assert layer.attention.self.probs_quantizer.signed is False
    model.train()
    out = model(**bert_inputs(), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    assert layer.attention.self.query_quantizer.step.grad is not None
    assert model.bert.embeddings.word_embeddings.weight.grad is not None


def test_dequantize_restores_the_original_model():
    model = tiny_bert()
    inputs = bert_inputs()
    expected = model(**inputs).logits
    classes = [type(module) for module in model.modules()]
    triton_bq.quantize_(model, triton_bq.QuantConfig(backend="reference"))
    triton_bq.dequantize_(model)
    assert [type(module) for module in model.modules()] == classes
    assert torch.equal(model(**inputs).logits, expected)


def test_quantized_state_dict_round_trip():
    model = tiny_bert()
    config = triton_bq.QuantConfig(weight_method="twn", act_bits=8, backend="reference")
    triton_bq.quantize_(model, config)
    inputs = bert_inputs()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, triton_bq.ActQuantizer) and module.method != "lsq":
                module.clip.mul_(0.8)
    state = model.state_dict()
    assert "bert.encoder.layer.0.attention.self.query.act_quantizer.clip" in state
    assert "bert.encoder.layer.0.attention.self.probs_quantizer.clip" in state
    other = triton_bq.quantize_(tiny_bert(seed=5), config)
    other.load_state_dict(state)
    assert torch.equal(other(**inputs).logits, model(**inputs).logits)


def test_filter_fn_and_pooler_policy():
    model = tiny_bert()
    config = triton_bq.QuantConfig(quantize_pooler=False, backend="reference")
    triton_bq.quantize_(model, config)
    assert type(model.bert.pooler.dense) is nn.Linear
    model = tiny_bert()
    triton_bq.quantize_(model, config, filter_fn=lambda module, name: name.endswith("query"))
    quantized = [name for name, m in model.named_modules() if isinstance(m, triton_bq.QuantLinear)]
    assert quantized == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]


def test_attention_records_masked_pre_softmax_scores():
    model = tiny_bert()
    inputs = bert_inputs()
    attention = model.bert.encoder.layer[0].attention.self
    quantize_attention(attention, act_bits=None)
    attention.record_scores = True
    hidden = model.bert.embeddings(input_ids=inputs["input_ids"])
    model(**inputs)
    q = attention.query(hidden).view(3, 10, 4, 8).transpose(1, 2)
    k = attention.key(hidden).view(3, 10, 4, 8).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    keep = inputs["attention_mask"][:, None, None, :].bool()
    expected = torch.where(keep, scores, torch.zeros_like(scores))
    assert torch.allclose(attention.scores, expected, atol=1e-5)
    assert (attention.scores[0, :, :, 7:] == 0).all()


def test_vit_swap_trains():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=48, num_labels=3,
    )
    model = transformers.ViTForImageClassification(config)
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="bwn", act_bits=8, backend="reference"))
    assert type(model.classifier) is nn.Linear
    assert isinstance(model.vit.layers[0].attention.q_proj, triton_bq.BinaryLinear)
    out = model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert model.vit.layers[0].mlp.fc1.weight.grad is not None


def test_gpt_neo_swap_with_quantized_embedding():
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(
        vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
        max_position_embeddings=32,
    )
    model = transformers.GPTNeoForCausalLM(config)
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="twn", act_bits=None, backend="reference"))
    assert isinstance(model.transformer.wte, triton_bq.QuantEmbedding)
    assert isinstance(model.transformer.h[0].mlp.c_fc, triton_bq.TernaryLinear)
    ids = torch.randint(0, 50, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_quantize_rejects_bad_config():
    with pytest.raises(TypeError, match="QuantConfig"):
        triton_bq.quantize_(tiny_bert(), {"weight_method": "bwn"})
    with pytest.raises(ValueError, match="xnor"):
        triton_bq.QuantConfig(weight_method="xnor")
    with pytest.raises(ValueError, match="12"):
        triton_bq.QuantConfig(act_bits=12)
