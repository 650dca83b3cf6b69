"""PackedLinear / PackedEmbedding against the training layers, and save_packed / load_packed of a quantized BERT."""

import json
import struct

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import triton_bq
from triton_bq import bitpack, reference
from triton_bq.export import size
from triton_bq.export.format import MANIFEST_NAME, WEIGHTS_NAME, pack_model
from triton_bq.export.io import load_packed, save_packed
from triton_bq.nn import PackedEmbedding, PackedLinear
from triton_bq.recipe.tws import split_ternary_to_binary


def assert_float_close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def assert_model_close(actual, expected):
    """Whole-model outputs. Between layers, 8-bit / 4-bit activation quantizers round the previous layer's output:
    on a GPU a last-bit difference (fused multiply-add, summation order) can move one element to the next level, so
    CUDA allows 1e-3 of the largest logit; the CPU interpreter is deterministic and held to float32 rounding."""
    relative = 1e-3 if actual.is_cuda else 1e-5
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=relative, atol=relative * scale)


def codes_of(layer):
    """The codes the training layer's forward uses (reference quantizer)."""
    _, threshold = layer.weight_scale_threshold()
    return reference.weight_codes(layer.weight, threshold)


LINEAR_CASES = [
    pytest.param("bwn", "tensor", dict(act_bits=None), id="bwn-tensor-fp"),
    pytest.param("bwn", "row", dict(act_bits=8), id="bwn-row-a8sym"),
    pytest.param("twn", "tensor", dict(act_bits=8, act_method="asym"), id="twn-tensor-a8asym"),
    pytest.param("lat", "row", dict(act_bits=4), id="lat-row-a4lsq"),
    pytest.param("twn", "row", dict(act_bits=4, act_signed=False), id="twn-row-a4lsq-unsigned"),
    pytest.param("bwn", "tensor", dict(act_bits=8, act_method="lsq", act_signed=False), id="bwn-tensor-a8lsq-unsigned"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("weight_method, granularity, act", LINEAR_CASES)
def test_packed_linear_matches_the_training_layer(weight_method, granularity, act, backend, device):
    torch.manual_seed(0)
    layer = triton_bq.QuantLinear(
        100, 33, weight_method=weight_method, granularity=granularity, backend="reference", **act
    ).to(device).eval()
    x = torch.randn(2, 5, 100).to(device)
    layer(x)  # initialises an LSQ step from the first batch, as in training
    packed = PackedLinear.from_quant_linear(layer, backend=backend)
    assert packed.bits == (1 if weight_method == "bwn" else 2) and packed.granularity == granularity
    assert torch.equal(packed.packed.codes()[0], codes_of(layer))
    with torch.no_grad():
        for inputs in (x, x[0, :1]):
            assert_float_close(packed(inputs), layer(inputs))


def test_packed_linear_reads_the_lat_optimizer_state(device):
    torch.manual_seed(1)
    layer = triton_bq.TernaryLinear(64, 16, weight_method="lat", backend="reference").to(device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    triton_bq.attach_optimizer(layer, optimizer)
    layer(torch.randn(4, 64).to(device)).square().sum().backward()
    optimizer.step()
    layer.eval()
    packed = PackedLinear.from_quant_linear(layer)
    scale, _ = layer.weight_scale_threshold()
    assert torch.equal(packed.weight_scale.reshape(()), scale)
    assert torch.equal(packed.packed.codes()[0], codes_of(layer))
    x = torch.randn(3, 64).to(device)
    with torch.no_grad():
        assert_float_close(packed(x), layer(x))


@pytest.mark.parametrize("weight_method", ["bwn", "twn", "lat"])
def test_packed_embedding_matches_the_training_embedding(weight_method, device):
    torch.manual_seed(2)
    table = triton_bq.QuantEmbedding(50, 40, padding_idx=0, weight_method=weight_method).to(device).eval()
    packed = PackedEmbedding.from_quant_embedding(table)
    ids = torch.randint(0, 50, (3, 7)).to(device)
    ids[0, 0] = 0
    with torch.no_grad():
        assert torch.equal(packed(ids), table(ids))
    _, threshold = reference.weight_scale_threshold(table.weight, weight_method, "row")
    assert torch.equal(packed.packed.codes()[0], reference.weight_codes(table.weight, threshold))


def test_packed_linear_state_dict_round_trip(device):
    torch.manual_seed(3)
    layer = triton_bq.BinaryLinear(70, 9, act_bits=8, granularity="row", backend="reference").to(device)
    packed = PackedLinear.from_quant_linear(layer)
    fresh = PackedLinear(70, 9, bits=1, granularity="row", act_quantizer=triton_bq.ActQuantizer(8)).to(device)
    fresh.load_state_dict(packed.state_dict(), strict=True)
    assert set(packed.state_dict()) == {"packed_weight", "weight_scale", "bias", "act_quantizer.clip"}
    x = torch.randn(4, 70).to(device)
    assert torch.equal(fresh(x), packed(x))


def test_split_binary_layer_adds_both_halves(device):
    generator = torch.Generator().manual_seed(4)
    first, second = torch.randn(12, 48, generator=generator), torch.randn(12, 48, generator=generator)
    first, second, bias = first.to(device), second.to(device), torch.randn(12, generator=generator).to(device)
    layer = PackedLinear.from_packed(bitpack.pack_split_binary(first, second), bias)
    assert layer.parts == 2
    x = torch.randn(5, 48, generator=generator).to(device)
    expected = F.linear(x, reference.quantize_weight(first, "bwn") + reference.quantize_weight(second, "bwn"), bias)
    assert_float_close(layer(x), expected)


def test_packing_rejects_unpackable_layers():
    with pytest.raises(TypeError, match="QuantLinear"):
        PackedLinear.from_quant_linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="nothing to pack"):
        PackedLinear.from_quant_linear(triton_bq.QuantLinear(4, 4, weight_method=None, act_bits=8))
    with pytest.raises(TypeError, match="QuantEmbedding"):
        PackedEmbedding.from_quant_embedding(nn.Embedding(4, 4))


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------


def tiny_bert_config():
    return transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=32, num_labels=3, attn_implementation="eager",
    )


def quantized_bert(weight_method, act_bits, device):
    torch.manual_seed(5)
    model = transformers.BertForSequenceClassification(tiny_bert_config()).eval()
    full_precision_bytes = sum(tensor.numel() * 4 for tensor in model.state_dict().values())
    config = triton_bq.QuantConfig(weight_method=weight_method, act_bits=act_bits, backend="reference")
    triton_bq.quantize_(model, config)
    return model.to(device).eval(), full_precision_bytes


def batch(device):
    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 100, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device))


def safetensors_payload_bytes(path):
    with open(path, "rb") as handle:
        (header,) = struct.unpack("<Q", handle.read(8))
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("weight_method, act_bits", [("bwn", 8), ("twn", 4)], ids=["W1-A8", "W2-A4"])
def test_bert_save_load_round_trip(tmp_path, weight_method, act_bits, device):
    model, full_precision_bytes = quantized_bert(weight_method, act_bits, device)
    inputs = batch(device)
    with torch.no_grad():
        expected = model(**inputs).logits  # also initialises the LSQ steps (4-bit)
    sizes = save_packed(model, tmp_path)

    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    kinds = [entry["type"] for entry in manifest["modules"].values()]
    assert kinds.count("PackedLinear") == 2 * 6 + 1 and kinds.count("PackedEmbedding") == 1
    assert kinds.count("QuantSelfAttention") == 2 and manifest["architecture"] == "BertForSequenceClassification"

    loaded = load_packed(tmp_path, device=device)
    with torch.no_grad():
        assert_model_close(loaded(**inputs).logits, expected)

    bits = 1 if weight_method == "bwn" else 2
    code_bytes = 0
    training = dict(model.named_modules())
    for name, module in loaded.named_modules():
        if isinstance(module, PackedLinear):
            assert torch.equal(module.packed.codes()[0], codes_of(training[name]))
            code_bytes += module.packed_weight.numel() * 4
            assert module.packed_weight.numel() * 4 == module.out_features * module.in_features * bits // 8
        elif isinstance(module, PackedEmbedding):
            assert module.packed_weight.numel() * 4 == module.num_embeddings * module.embedding_dim * bits // 8
            code_bytes += module.packed_weight.numel() * 4

    # True size: the file holds exactly 1 (or 2) bits per quantized weight, float32 scales and the other tensors.
    payload = safetensors_payload_bytes(tmp_path / WEIGHTS_NAME)
    assert payload == sizes["packed_bytes"] == size.packed_size_bytes(model) == size.packed_size_bytes(loaded)
    scale_bytes = sum(
        module.weight_scale.numel() * 4 for module in loaded.modules() if isinstance(module, (PackedLinear,
                                                                                           PackedEmbedding))
    )
    other_bytes = sum(
        tensor.numel() * tensor.element_size()
        for key, tensor in loaded.state_dict().items()
        if not key.endswith(("packed_weight", "weight_scale"))
    )
    assert payload == code_bytes + scale_bytes + other_bytes
    # The fp32 size is the original full-precision model plus the activation quantizers' parameters.
    quantizer_bytes = sum(
        tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
        for key, tensor in model.state_dict().items()
        if "quantizer." in key
    )
    assert sizes["fp32_bytes"] == size.fp32_size_bytes(model) == full_precision_bytes + quantizer_bytes
    assert size.size_report(model)["compression"] == sizes["fp32_bytes"] / sizes["packed_bytes"]


def test_bert_load_into_a_given_model_or_config(tmp_path, device):
    model, _ = quantized_bert("bwn", 8, device)
    save_packed(model, tmp_path)
    inputs = batch(device)
    with torch.no_grad():
        expected = model(**inputs).logits
        skeleton = transformers.BertForSequenceClassification(tiny_bert_config())
        from_model = load_packed(tmp_path, skeleton, device=device, backend="reference")
        assert from_model is skeleton
        from_config = load_packed(tmp_path, tiny_bert_config(), device=device, backend="reference")
        assert_model_close(from_model(**inputs).logits, expected)
        assert torch.equal(from_config(**inputs).logits, from_model(**inputs).logits)
    assert not any(isinstance(module, PackedLinear) for module in model.modules())


class SelfPackingLinear(nn.Module):
    """Stand-in for a split-binary training layer: packs itself through the ``to_packed()`` hook."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.first = nn.Parameter(torch.randn(out_features, in_features))
        self.second = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x):
        weight = reference.quantize_weight(self.first, "bwn") + reference.quantize_weight(self.second, "bwn")
        return F.linear(x, weight, self.bias)

    def to_packed(self):
        return PackedLinear.from_packed(bitpack.pack_split_binary(self.first, self.second), self.bias.detach())


def test_to_packed_hook_and_plain_module_round_trip(tmp_path, device):
    torch.manual_seed(7)
    model = nn.Sequential(SelfPackingLinear(40, 24), nn.ReLU(), nn.Linear(24, 5)).to(device)
    x = torch.randn(3, 40).to(device)
    with torch.no_grad():
        expected = model(x)
        packed = pack_model(model)
        assert isinstance(packed[0], PackedLinear) and isinstance(model[0], SelfPackingLinear)
        assert_float_close(packed(x), expected)
    sizes = save_packed(model, tmp_path)
    assert sizes["packed_bytes"] == 2 * 24 * 2 * 4 + 2 * 4 + 24 * 4 + (24 * 5 + 5) * 4
    # fp32: the latent model (both halves of the split layer), no scales.
    assert sizes["fp32_bytes"] == (2 * 24 * 40 + 24 + 24 * 5 + 5) * 4
    loaded = load_packed(tmp_path, nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5)), device=device)
    with torch.no_grad():
        assert_float_close(loaded(x), expected)


def test_split_bert_round_trip(tmp_path, device):
    model, _ = quantized_bert("twn", 8, device)
    split_ternary_to_binary(model)
    model.eval()
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, triton_bq.SplitBinaryLinear)
    assert isinstance(model.bert.embeddings.word_embeddings, triton_bq.SplitBinaryEmbedding)
    # One layer whose halves were trained apart: different input clips need two kernel launches.
    with torch.no_grad():
        query.half2.act_quantizer.clip.mul_(0.5)
    inputs = batch(device)
    with torch.no_grad():
        expected = model(**inputs).logits
    sizes = save_packed(model, tmp_path)
    modules = json.loads((tmp_path / MANIFEST_NAME).read_text())["modules"]
    assert modules["bert.encoder.layer.0.attention.self.query"]["type"] == "PackedSplitLinear"
    assert modules["bert.encoder.layer.0.attention.self.key"]["parts"] == 2
    assert modules["bert.embeddings.word_embeddings"]["parts"] == 2
    loaded = load_packed(tmp_path, device=device)
    with torch.no_grad():
        assert_model_close(loaded(**inputs).logits, expected)
    key = model.bert.encoder.layer[0].attention.self.key
    packed_key = loaded.bert.encoder.layer[0].attention.self.key
    assert torch.equal(packed_key.packed.codes()[0], codes_of(key.half1))
    assert torch.equal(packed_key.packed.codes()[1], codes_of(key.half2))
    assert sizes["packed_bytes"] == safetensors_payload_bytes(tmp_path / WEIGHTS_NAME)


def test_load_rejects_a_foreign_manifest(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="manifest"):
        load_packed(tmp_path, nn.Linear(2, 2))
