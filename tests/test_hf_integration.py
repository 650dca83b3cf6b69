"""transformers integration (triton_bq.export.hf): plain ``from_pretrained`` loads what triton_bq saves.

Round trips of tiny random models: BERT latent, TWS-split, width-shrunk and packed; GPT-2 (tied LM head) and Llama
latent and packed; a full-precision checkpoint quantized for QAT by ``quantization_config``; folders that do not fit
raise. Also ``copy.deepcopy`` / ``torch.save`` of quantized models.
"""

import copy
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_bert import bert_inputs, tiny_bert

import triton_bq
from triton_bq import QuantConfig, TritonBQConfig
from triton_bq.export.format import MANIFEST_NAME, WEIGHTS_NAME

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = transformers.AutoModelForSequenceClassification
CAUSAL = transformers.AutoModelForCausalLM


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def reload(model, directory, auto=SEQUENCE):
    model.save_pretrained(directory)
    return auto.from_pretrained(directory)


def assert_same_modules(first, second):
    """Same module classes at the same names, same state-dict keys and shapes."""
    assert [(name, type(module).__name__) for name, module in first.named_modules()] == [
        (name, type(module).__name__) for name, module in second.named_modules()]
    first_state, second_state = first.state_dict(), second.state_dict()
    assert {key: value.shape for key, value in first_state.items()} == {
        key: value.shape for key, value in second_state.items()}
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def lm_inputs(vocab):
    torch.manual_seed(3)
    return dict(input_ids=torch.randint(1, vocab, (2, 9)))


# ---- BERT ----


@pytest.mark.parametrize("method", ["bwn", "twn"])
def test_bert_latent_round_trip(tmp_path, method):
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method=method))
    inputs = bert_inputs()
    loaded = reload(model, tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert record["quant_method"] == "triton_bq" and record["format"] == "latent"
    assert record["quant_config"]["weight_method"] == method
    assert_same_modules(model, loaded)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert isinstance(loaded.config.quantization_config, TritonBQConfig)
    # A loaded model saves and loads again the same.
    again = reload(loaded, tmp_path / "again")
    assert torch.equal(logits(again, inputs), logits(model, inputs))


def test_bert_split_and_width_shrunk_round_trip(tmp_path):
    model = tiny_bert()
    plan = triton_bq.shrink_width_(model, 0.5)
    triton_bq.quantize_(model, QuantConfig(weight_method="twn"))
    triton_bq.split_ternary_to_binary(model)
    inputs = bert_inputs()
    loaded = reload(model, tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert record["width_plan"] == plan
    query = "bert.encoder.layer.0.attention.self.query"
    assert record["modules"][query]["type"] == "SplitBinaryLinear"
    assert isinstance(loaded.get_submodule(query), triton_bq.SplitBinaryLinear)
    assert loaded.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert_same_modules(model, loaded)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_bert_packed_folder_is_a_transformers_folder(tmp_path):
    model = tiny_bert()
    triton_bq.shrink_width_(model, 0.5)
    triton_bq.quantize_(model, QuantConfig(weight_method="twn"))
    triton_bq.split_ternary_to_binary(model)
    sizes = triton_bq.save_packed(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["quantization_config"]["format"] == "packed"
    packed = triton_bq.load_packed(tmp_path)
    loaded = SEQUENCE.from_pretrained(tmp_path)
    assert isinstance(loaded.bert.encoder.layer[0].attention.self.query, triton_bq.PackedLinear)
    inputs = bert_inputs()
    assert torch.equal(logits(loaded, inputs), logits(packed, inputs))
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5)
    assert sizes["packed_bytes"] == triton_bq.model_size_report(model).stored_bytes
    # The packed model loaded by transformers saves and loads again.
    again = reload(loaded, tmp_path / "again")
    assert torch.equal(logits(again, inputs), logits(packed, inputs))


def test_full_precision_checkpoint_quantized_for_qat(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    quantization = TritonBQConfig(QuantConfig(weight_method="twn"), split=True, width_plan=0.5)
    loaded = SEQUENCE.from_pretrained(tmp_path, quantization_config=quantization)
    expected = tiny_bert()
    triton_bq.shrink_width_(expected, 0.5)
    triton_bq.quantize_(expected, QuantConfig(weight_method="twn"))
    triton_bq.split_ternary_to_binary(expected)
    assert_same_modules(expected, loaded)
    inputs = bert_inputs()
    assert torch.equal(logits(loaded, inputs), logits(expected, inputs))
    assert loaded.hf_quantizer.is_qat_trainable
    # Trainable: a step changes the latent weights, and the result saves and loads back.
    loaded.train()
    loaded(**inputs, labels=torch.tensor([0, 1, 1])).loss.backward()
    assert loaded.bert.encoder.layer[0].attention.self.query.half1.weight.grad is not None
    again = reload(loaded.eval(), tmp_path / "again")
    assert torch.equal(logits(again, inputs), logits(loaded, inputs))


def test_quant_config_needed_for_a_full_precision_checkpoint(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a quant_config"):
        SEQUENCE.from_pretrained(tmp_path, quantization_config=TritonBQConfig())


def test_bad_config_fields_raise():
    with pytest.raises(ValueError, match="split"):
        TritonBQConfig(QuantConfig(), split="all")
    with pytest.raises(ValueError, match="unknown TritonBQConfig fields"):
        TritonBQConfig(QuantConfig(), bits=3)
    with pytest.raises(ValueError, match="quant_config has unknown fields"):
        TritonBQConfig({"weight_method": "bwn", "wbits": 1})
    with pytest.raises(TypeError, match="quant_config"):
        TritonBQConfig("bwn")


def test_keys_that_do_not_fit_raise(tmp_path):
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="twn"))
    triton_bq.split_ternary_to_binary(model)
    model.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    state = load_file(str(weights))
    key = "bert.encoder.layer.0.attention.self.query.half2.weight"
    del state[key]
    state["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(32, 32)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not fit") as error:
        SEQUENCE.from_pretrained(tmp_path)
    assert key in str(error.value) and "attention.self.query.weight" in str(error.value)


def test_record_of_another_architecture_raises(tmp_path):
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="bwn"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["modules"]["bert.encoder.layer.9.output.dense"] = (
        config["quantization_config"]["modules"]["bert.encoder.layer.0.output.dense"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not have"):
        SEQUENCE.from_pretrained(tmp_path)


def test_packed_weights_changed_after_export_raise(tmp_path):
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="bwn"))
    triton_bq.save_packed(model, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8 * [0x55])
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        SEQUENCE.from_pretrained(tmp_path)


def test_without_import_transformers_skips_the_method(tmp_path):
    """What plain transformers does with a triton_bq folder when triton_bq is not imported (documented in
    triton_bq.export.hf): a warning naming the unknown method, and the plain architecture."""
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="twn"))
    triton_bq.split_ternary_to_binary(model)
    model.save_pretrained(tmp_path)
    code = ("import transformers, sys; transformers.logging.set_verbosity_warning(); "
            f"m = transformers.AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}); "
            "print('MODULE', type(m.bert.encoder.layer[0].attention.self.query).__name__); "
            "print('IMPORTED', 'triton_bq' in sys.modules)")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "MODULE Linear" in result.stdout and "IMPORTED False" in result.stdout
    assert "Unknown quantization type, got triton_bq" in result.stderr


# ---- GPT-2 (tied LM head) and Llama ----


def test_gpt2_latent_and_packed_with_tied_head(tmp_path):
    model = triton_bq.quantize_(tiny_gpt2(), QuantConfig(weight_method="bwn", act_bits=None))
    assert model.lm_head.weight is model.transformer.wte.weight
    inputs = lm_inputs(100)
    loaded = reload(model, tmp_path / "latent", CAUSAL)
    assert isinstance(loaded.transformer.wte, triton_bq.QuantEmbedding)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    sizes = triton_bq.save_packed(model, tmp_path / "packed")
    keys = load_file(str(tmp_path / "packed" / WEIGHTS_NAME)).keys()
    # The head is quantized on the tied table (triton_bq.arch): one packed copy, under the embedding's keys.
    assert "transformer.wte.packed_weight" in keys and not any(key.startswith("lm_head.") for key in keys)
    assert "transformer.wte.weight" not in keys
    # The size report counts what is written: the packed table once.
    assert sizes["packed_bytes"] == triton_bq.model_size_report(model).stored_bytes
    packed = triton_bq.load_packed(tmp_path / "packed")
    from_hf = CAUSAL.from_pretrained(tmp_path / "packed")
    assert isinstance(from_hf.transformer.wte, triton_bq.PackedEmbedding)
    assert torch.equal(logits(from_hf, inputs), logits(packed, inputs))
    assert torch.equal(logits(packed, inputs), logits(triton_bq.pack_model(model), inputs))


def test_unquantized_tied_weights_are_written_once(tmp_path):
    """A full-precision word embedding tied to the LM head (embedding_method=None; the Conv1D projections are packed)
    is written once and tied again at load."""
    model = triton_bq.quantize_(tiny_gpt2(), QuantConfig(weight_method="bwn", embedding_method=None, act_bits=None))
    sizes = triton_bq.save_packed(model, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert sizes["packed_bytes"] == triton_bq.model_size_report(model).stored_bytes
    inputs = lm_inputs(100)
    packed = triton_bq.load_packed(tmp_path)
    assert packed.lm_head.weight is packed.transformer.wte.weight
    from_hf = CAUSAL.from_pretrained(tmp_path)
    assert from_hf.lm_head.weight is from_hf.transformer.wte.weight
    assert torch.equal(logits(from_hf, inputs), logits(packed, inputs))


def test_llama_latent_and_packed(tmp_path):
    model = triton_bq.quantize_(tiny_llama(), QuantConfig(weight_method="twn", act_bits=8))
    inputs = lm_inputs(96)
    loaded = reload(model, tmp_path / "latent", CAUSAL)
    assert_same_modules(model, loaded)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    triton_bq.save_packed(model, tmp_path / "packed")
    packed = triton_bq.load_packed(tmp_path / "packed")
    from_hf = CAUSAL.from_pretrained(tmp_path / "packed")
    assert isinstance(from_hf.model.layers[0].mlp.gate_proj, triton_bq.PackedLinear)
    assert torch.equal(logits(from_hf, inputs), logits(packed, inputs))
    torch.testing.assert_close(logits(packed, inputs), logits(model, inputs), rtol=1e-4, atol=1e-4)


# ---- copies ----


def torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_torch_save_of_quantized_lms(factory):
    model = triton_bq.quantize_(factory(), QuantConfig(weight_method="twn", act_bits=8))
    inputs = lm_inputs(model.config.vocab_size)
    assert torch.equal(logits(torch_save_load(model), inputs), logits(model, inputs))
    assert torch.equal(logits(copy.deepcopy(model), inputs), logits(model, inputs))


def test_torch_save_of_quantized_bert():
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="bwn", act_bits=8))
    inputs = bert_inputs()
    try:
        loaded = torch_save_load(model)
    except Exception as error:  # noqa: BLE001 - only the dynamic attention class (issue 15) may fail here
        if "QuantBertSelfAttention" in str(error) and not hasattr(triton_bq.nn.attention, "QuantBertSelfAttention"):
            pytest.skip(f"quantized attention is a dynamically created class until issue 15 lands: {error}")
        raise
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_lat_copies_keep_outputs_and_warn():
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="lat", act_bits=None))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert triton_bq.attach_optimizer(model, optimizer) > 0
    inputs = bert_inputs()
    model.train()
    model(**inputs, labels=torch.tensor([0, 1, 1])).loss.backward()
    optimizer.step()
    expected = logits(model, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copied = copy.deepcopy(model)
        saved = torch_save_load(model)
    assert any("frozen copy of Adam's second moment" in str(warning.message) for warning in caught)
    assert torch.equal(logits(copied, inputs), expected)
    assert torch.equal(logits(saved, inputs), expected)
    # Without the frozen moment (D = 1) the outputs would differ: the copy really reads it.
    fresh = copy.deepcopy(copied)
    for module in fresh.modules():
        module.__dict__.pop("_lat_optimizer", None)
    assert not torch.equal(logits(fresh, inputs), expected)
    # Re-attaching links the copy to its own optimizer.
    assert triton_bq.attach_optimizer(copied, torch.optim.Adam(copied.parameters())) > 0


def test_lat_second_moments_save_and_restore_exactly(tmp_path):
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="lat", act_bits=None))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    triton_bq.attach_optimizer(model, optimizer)
    assert triton_bq.second_moments(model) == {}  # no step yet: nothing to save
    inputs = bert_inputs()
    model.train()
    model(**inputs, labels=torch.tensor([0, 1, 1])).loss.backward()
    optimizer.step()
    expected = logits(model, inputs)
    moments = triton_bq.second_moments(model)
    lat_names = [name for name, module in model.named_modules() if getattr(module, "weight_method", None) == "lat"]
    assert sorted(moments) == sorted(lat_names)
    path = tmp_path / "moments.safetensors"
    save_file(moments, str(path))
    state = model.state_dict()
    reloaded = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="lat", act_bits=None))
    reloaded.load_state_dict(state)
    assert not torch.equal(logits(reloaded, inputs), expected)  # D = 1 without the moments
    assert triton_bq.load_second_moments(reloaded, load_file(str(path))) == len(moments)
    assert torch.equal(logits(reloaded, inputs), expected)
    name = lat_names[0]
    with pytest.raises(ValueError, match=r"moments\['nope'\]: 'nope' is not a weight_method='lat' module"):
        triton_bq.load_second_moments(reloaded, {"nope": moments[name]})
    with pytest.raises(ValueError, match=rf"moments\['{name}'\] must have the shape of its weight"):
        triton_bq.load_second_moments(reloaded, {name: moments[name][:1]})
