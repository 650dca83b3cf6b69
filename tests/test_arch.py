"""The architecture table on tiny random-init models of every family: which layers are quantized, tied embeddings,
Conv1D, attention quantization, errors instead of silent no-ops, pickling."""

import io
import pickle
import warnings

import pytest
import torch
import transformers
from families import FAMILY_NAMES, model_inputs, tiny_model
from tiny_bert import bert_inputs, tiny_bert
from torch import nn
from transformers.pytorch_utils import Conv1D

import triton_bq
from triton_bq import reference
from triton_bq.arch import FAMILIES, family_of, matches
from triton_bq.nn.attention import QuantSelfAttentionMixin
from triton_bq.nn.linear import QuantConv1D
from triton_bq.recipe.tws import split_ternary_to_binary

BWN_A8 = triton_bq.QuantConfig(weight_method="bwn", act_bits=8, backend="reference")

# Hand-counted per family: quantized Linear/Conv1D layers (tied lm_head included), word embeddings, attention modules.
COUNTS = {
    "bert": (2 * 6 + 1, 1, 2),  # 6 per layer + pooler
    "roberta": (2 * 6, 1, 2),  # no pooler in the sequence-classification model; classifier.dense is the head
    "distilbert": (2 * 6, 1, 2),  # pre_classifier + classifier are the head
    "albert": (6 + 2, 1, 1),  # one shared layer, embedding_hidden_mapping_in, pooler
    "gpt2": (2 * 4 + 1, 1, 2),  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer + lm_head tied to wte
    "llama": (2 * 7, 1, 2),
    "qwen2": (2 * 7, 1, 2),
    "vit": (2 * 6, 0, 2),
    "t5": (2 * 6 + 2 * 10 + 1, 3, 2 + 2 * 2),  # decoder layers have cross-attention; lm_head tied to shared
    "bart": (2 * 6 + 2 * 10 + 1, 3, 2 + 2 * 2),
}
ASYM_SITES = {
    "bert": ("bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.attention.output.dense"),
    "roberta": ("roberta.encoder.layer.1.output.dense", "roberta.encoder.layer.1.intermediate.dense"),
    "distilbert": ("distilbert.transformer.layer.0.ffn.lin2", "distilbert.transformer.layer.0.attention.out_lin"),
    "albert": ("albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output",
               "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.dense"),
    "gpt2": ("transformer.h.0.mlp.c_proj", "transformer.h.0.attn.c_proj"),
    "llama": (None, "model.layers.0.mlp.down_proj"),
    "qwen2": (None, "model.layers.1.mlp.down_proj"),
    "vit": ("vit.layers.0.mlp.fc2", "vit.layers.0.mlp.fc1"),
    "t5": ("encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.0.layer.0.SelfAttention.o"),
    "bart": ("model.decoder.layers.1.fc2", "model.decoder.layers.1.encoder_attn.out_proj"),
}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _weight_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_quantizes_the_table_layers(family):
    model = tiny_model(family)
    inputs = model_inputs(family)
    expected = _logits(model, inputs)
    entry = family_of(model)
    assert entry is not None and entry.name == ("llama" if family == "qwen2" else family)
    table = {name for name in _weight_layers(model) if matches(entry.weights, name)}
    triton_bq.quantize_(model, BWN_A8)
    quantized = {name for name, module in model.named_modules() if isinstance(module, triton_bq.QuantLinear)}
    tied_heads = quantized - table
    assert table <= quantized and tied_heads <= {"lm_head"}
    linears, embeddings, attentions = COUNTS[family]
    assert len(quantized) == linears
    quant_embeddings = [m for m in model.modules() if isinstance(m, triton_bq.QuantEmbedding)]
    assert len(quant_embeddings) == embeddings
    attention = [m for m in model.modules() if isinstance(m, QuantSelfAttentionMixin)]
    assert len(attention) == attentions and all(m.probs_quantizer is not None for m in attention)
    # The projections the table names sit inside the quantized attention modules.
    projections = {name for name in quantized if matches(entry.projections, name)}
    inside = {f"{name}.{inner}" for name, module in model.named_modules() if isinstance(module, QuantSelfAttentionMixin)
              for inner, _ in module.named_modules() if f"{name}.{inner}" in projections}
    assert projections and inside == projections
    asym, sym = ASYM_SITES[family]
    modules = dict(model.named_modules())
    if asym is not None:
        assert modules[asym].act_quantizer.method == "asym"
    assert modules[sym].act_quantizer.method == "sym"
    # The probabilities quantizer runs in every quantized attention module.
    calls = []
    for module in attention:
        module.probs_quantizer.register_forward_hook(lambda *args: calls.append(1))
    out = _logits(model, inputs)
    assert len(calls) == (2 if family == "albert" else attentions)  # ALBERT applies its one layer twice
    assert out.shape == expected.shape and torch.isfinite(out).all() and not torch.allclose(out, expected)
    triton_bq.dequantize_(model)
    assert not any(isinstance(m, (triton_bq.QuantLinear, triton_bq.QuantEmbedding, QuantSelfAttentionMixin))
                   for m in model.modules())
    assert torch.equal(_logits(model, inputs), expected)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_quantized_family_trains(family):
    model = tiny_model(family).train()
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="twn", act_bits=4, backend="reference"))
    out = model(**model_inputs(family))
    out.logits.float().square().mean().backward()
    layers = [m for m in model.modules() if isinstance(m, triton_bq.QuantLinear)]
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in layers)
    steps = [m.step for m in model.modules() if isinstance(m, triton_bq.ActQuantizer) and m.method == "lsq"]
    assert steps and all(step.grad is not None for step in steps)


def test_table_names_are_distinct_and_cover_the_issue_families():
    names = [family.name for family in FAMILIES]
    assert len(names) == len(set(names))
    types = {model_type for family in FAMILIES for model_type in family.model_types}
    assert {"bert", "roberta", "distilbert", "albert", "gpt2", "llama", "mistral", "qwen2", "vit", "t5",
            "bart"} <= types


def _row_quantized(weight, method="bwn"):
    return reference.quantize_weight(weight.detach(), method, "row")


@pytest.mark.parametrize("family", ["t5", "bart", "gpt2"])
def test_tied_embeddings_are_quantized_once_and_used_everywhere(family):
    """The logits equal those of the full-precision model whose (tied) word embedding is the quantized table: the
    encoder / decoder lookups and the tied lm_head all compute with it (and BART keeps its embedding scale)."""
    config = triton_bq.QuantConfig(weight_method=None, embedding_method="bwn", act_bits=None, backend="reference")
    model = tiny_model(family)
    inputs = model_inputs(family)
    fp = _logits(model, inputs)
    reference_model = tiny_model(family)
    embedding = reference_model.get_input_embeddings()
    with torch.no_grad():
        embedding.weight.copy_(_row_quantized(embedding.weight))
    expected = _logits(reference_model, inputs)
    triton_bq.quantize_(model, config)
    latent = model.get_input_embeddings().weight
    tied = [m for m in model.modules() if getattr(m, "weight", None) is latent]
    assert all(isinstance(m, (triton_bq.QuantEmbedding, triton_bq.QuantLinear)) for m in tied)
    assert isinstance(model.lm_head, triton_bq.QuantLinear) and model.lm_head.granularity == "row"
    if family == "bart":
        assert model.model.encoder.embed_tokens.embed_scale == 32**0.5
        assert type(model.model.encoder.embed_tokens).__name__ == "QuantBartScaledWordEmbedding"
    out = _logits(model, inputs)
    assert not torch.allclose(out, fp)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert sum(p is latent for p in model.parameters()) == 1
    report = triton_bq.model_size_report(model)
    vocab_rows = [e for e in report.entries if e.numel == latent.numel() and e.component == "binary weights"]
    assert len(vocab_rows) == 1
    triton_bq.dequantize_(model)
    assert torch.equal(_logits(model, inputs), fp)


def test_conv1d_is_quantized_like_a_linear_and_packs():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)
    x = torch.randn(3, 5, 16)
    for method, granularity in (("bwn", "tensor"), ("twn", "row")):
        layer = QuantConv1D.from_conv1d(conv, weight_method=method, granularity=granularity, act_bits=8,
                                        backend="reference")
        assert layer.weight is conv.weight and layer.weight.shape == (16, 24)
        linear = triton_bq.QuantLinear(16, 24, weight_method=method, granularity=granularity, act_bits=8,
                                       backend="reference")
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)
        packed = triton_bq.PackedLinear.from_quant_linear(layer, backend="reference")
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
        assert isinstance(layer.to_conv1d(), Conv1D) and layer.to_conv1d().weight is conv.weight


def test_gpt2_ternary_split_and_size():
    model = tiny_model("gpt2")
    inputs = model_inputs("gpt2")
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="twn", act_bits=None, backend="reference"))
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantConv1D)
    report = triton_bq.model_size_report(model)
    c_attn = next(e for e in report.entries if e.name == "transformer.h.0.attn.c_attn.weight")
    assert c_attn.bits == 2 and c_attn.stored_bytes == 96 * 2 * 4  # 96 output rows of 32 2-bit codes: 2 int32 words
    ternary = _logits(model, inputs)
    split_ternary_to_binary(model)
    assert isinstance(model.transformer.h[0].mlp.c_fc, triton_bq.SplitBinaryLinear)
    # The tied word embedding and lm_head keep sharing their (split) latent halves.
    assert model.lm_head.half1.weight is model.transformer.wte.half1.weight
    torch.testing.assert_close(_logits(model, inputs), ternary, rtol=1e-4, atol=1e-4)


def test_unknown_family_gets_the_generic_swap_and_one_warning():
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
                                       attention_types=[[["global"], 1]], max_position_embeddings=32)
    model = transformers.GPTNeoForCausalLM(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        triton_bq.quantize_(model, BWN_A8)
    messages = [str(w.message) for w in caught if "triton_bq.arch" in str(w.message)]
    assert len(messages) == 1
    assert "gpt_neo" in messages[0] and "transformer.wpe (Embedding)" in messages[0]
    assert "transformer.h.0.attn.attention (GPTNeoSelfAttention" in messages[0]
    assert isinstance(model.transformer.h[0].mlp.c_fc, triton_bq.BinaryLinear)


def test_quantize_that_quantizes_nothing_raises():
    with pytest.raises(ValueError, match="found nothing to quantize in Sequential"):
        triton_bq.quantize_(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), BWN_A8)
    config = triton_bq.QuantConfig(embedding_method=None, quantize_attention=False, backend="reference")
    with pytest.raises(ValueError, match="found nothing"):
        triton_bq.quantize_(tiny_bert(), config, filter_fn=lambda module, name: False)


def test_requantizing_with_another_config_raises_naming_the_module():
    model = triton_bq.quantize_(tiny_bert(), BWN_A8)
    with pytest.raises(ValueError, match=r"word_embeddings.*weight_method='bwn', the config asks 'twn'"):
        triton_bq.quantize_(model, triton_bq.QuantConfig("twn", backend="reference"))
    with pytest.raises(ValueError, match="act_bits"):
        triton_bq.quantize_(model, triton_bq.QuantConfig("bwn", act_bits=4, backend="reference"))
    with pytest.raises(ValueError, match="already quantized with this config"):
        triton_bq.quantize_(model, BWN_A8)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, triton_bq.BinaryLinear)


def test_split_without_ternary_layer_raises():
    with pytest.raises(ValueError, match="no ternary layer.*BinaryLinear"):
        split_ternary_to_binary(triton_bq.quantize_(tiny_bert(), BWN_A8))
    with pytest.raises(ValueError, match="no ternary layer.*none"):
        split_ternary_to_binary(tiny_bert())


def test_quantized_bert_pickles():
    model = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig("twn", act_bits=4, backend="reference"))
    inputs = bert_inputs()
    expected = _logits(model, inputs)
    restored = pickle.loads(pickle.dumps(model))
    attention = restored.bert.encoder.layer[0].attention.self
    assert isinstance(attention, QuantSelfAttentionMixin) and type(attention).__name__ == "QuantBertSelfAttention"
    assert type(attention) is type(model.bert.encoder.layer[0].attention.self)
    assert torch.equal(_logits(restored, inputs), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(_logits(loaded, inputs), expected)
    triton_bq.dequantize_(loaded)
    assert type(loaded.bert.encoder.layer[0].attention.self) is transformers.models.bert.modeling_bert.BertSelfAttention


@pytest.mark.parametrize("action", ["split", "binarize", "pack"])
def test_embedding_subclass_with_its_own_forward_is_never_split_or_packed_silently(action):
    # BART's scaled embedding multiplies the lookup by embed_scale; split / binary / packed tables are plain lookups.
    model = tiny_model("bart")
    triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="twn", act_bits=None, backend="reference"))
    with pytest.raises(ValueError, match=rf"cannot {action} model\.shared: it is a quantized BartScaledWordEmbedding"):
        if action == "split":
            triton_bq.split_ternary_to_binary(model)
        elif action == "binarize":
            triton_bq.split_ternary_to_binary(model, include=[])
        else:
            triton_bq.pack_model(model)
    assert type(model.model.encoder.embed_tokens).__name__ == "QuantBartScaledWordEmbedding"
