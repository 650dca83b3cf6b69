"""Module swap on Hugging Face models (random init, no download): BERT with attention quantization, ViT, GPT-Neo."""

import pytest
import torch
import transformers
from tiny_bert import bert_inputs, tiny_bert
from torch import nn

import triton_bq
from triton_bq import reference as ref
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


def test_ternary_a4_swap_uses_lsq_and_binarybert_asym_lsq():
    model = tiny_bert()
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="twn", act_bits=4, backend="reference"))
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, triton_bq.TernaryLinear)
    assert layer.intermediate.dense.act_quantizer.method == "lsq"
    # BinaryBERT (sym_quant_ffn_attn=False): asymmetric LSQ for the FFN-output input and the probabilities.
    assert layer.output.dense.act_quantizer.method == "asym_lsq"
    assert layer.attention.self.probs_quantizer.method == "asym_lsq"
    model.train()
    inputs = bert_inputs()
    captured = {}

    def keep_output_grad(name):
        def hook(module, args, output):
            captured[name] = (args[0].detach(), output)
            output.register_hook(lambda grad: captured.__setitem__(name + ".grad", grad))
        return hook

    quantizer = layer.attention.self.query_quantizer
    embedding = model.bert.embeddings.word_embeddings
    handles = [quantizer.register_forward_hook(keep_output_grad("query")),
               embedding.register_forward_hook(keep_output_grad("embedding"))]
    out = model(**inputs, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    for handle in handles:
        handle.remove()
    # LSQ (Esser et al.): dL/ds = sum(g * local) / sqrt(numel * Qp), local = Qn / Qp when saturated, else
    # round(v) - v, with v = x / s; signed 4 bits: Qn = -8, Qp = 7.
    x, g = captured["query"][0], captured["query.grad"]
    v = x / quantizer.step.detach()
    local = torch.where(v <= -8, -8.0, torch.where(v >= 7, 7.0, torch.round(v) - v))
    expected_step = (g * local).sum() / (x.numel() * 7) ** 0.5
    torch.testing.assert_close(quantizer.step.grad, expected_step.reshape(1), rtol=1e-4, atol=1e-7)
    # Identity STE on the embedding: the latent table's gradient is the looked-up rows' gradient, summed per id.
    g = captured["embedding.grad"]
    expected_table = torch.zeros_like(embedding.weight).index_add_(0, inputs["input_ids"].reshape(-1),
                                                                   g.reshape(-1, g.shape[-1]))
    torch.testing.assert_close(embedding.weight.grad, expected_table, rtol=1e-5, atol=1e-7)


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
    fc1, captured = model.vit.layers[0].mlp.fc1, {}

    def hook(module, args, output):
        captured["x"] = args[0].detach()
        output.register_hook(lambda grad: captured.__setitem__("grad", grad))

    handle = fc1.register_forward_hook(hook)
    out = model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2]))
    out.loss.backward()
    handle.remove()
    # Identity STE: dL/dW = g^T @ Q(x) over all tokens, with the layer's own 8-bit input quantizer.
    with torch.no_grad():
        quantized_x = fc1.act_quantizer(captured["x"]).reshape(-1, fc1.in_features)
    expected = captured["grad"].reshape(-1, fc1.out_features).T @ quantized_x
    torch.testing.assert_close(fc1.weight.grad, expected, rtol=1e-5, atol=1e-6)


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
    # The loss is that of the full-precision model whose weights are the ternary ones: T(w) in the 6 Linears of
    # each block and in the (row-wise) word embedding.
    # The head tied to the word embedding is quantized once with it: it reads the same row-wise T(w) table.
    plain = transformers.GPTNeoForCausalLM(config)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (triton_bq.TernaryLinear, triton_bq.QuantEmbedding)):
            granularity = "row" if isinstance(module, triton_bq.QuantEmbedding) else module.granularity
            alpha, delta = ref.weight_scale_threshold(module.weight, "twn", granularity)
            state[f"{name}.weight"] = alpha * ref.twn_codes(module.weight, delta).float()
    assert len(state) == 2 * 6 + 2 and model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(state["lm_head.weight"], state["transformer.wte.weight"], rtol=0, atol=0)
    full = {key: value for key, value in model.state_dict().items()}
    full.update(state)
    plain.load_state_dict(full, strict=True)
    with torch.no_grad():
        expected = plain(input_ids=ids, labels=ids).loss
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_quantize_rejects_bad_config():
    with pytest.raises(TypeError, match="QuantConfig"):
        triton_bq.quantize_(tiny_bert(), {"weight_method": "bwn"})
    with pytest.raises(ValueError, match="xnor"):
        triton_bq.QuantConfig(weight_method="xnor")
    with pytest.raises(ValueError, match="12"):
        triton_bq.QuantConfig(act_bits=12)
