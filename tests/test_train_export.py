"""train/glue.py exports every final model as a packed folder that plain transformers loads (after
``import triton_bq``) with its tokenizer, and the latent ``best/`` folders load the same way.

One tiny run (the fixtures of ``test_train_glue``): teacher, ternary student, ternary weight splitting and the
binary student, one epoch each.
"""

import json

import pytest
import torch
import transformers
from test_train_glue import DEV_SIZE, dev_accuracy_of, read_done, run_script, tiny, tiny_argv  # noqa: F401

import triton_bq


@pytest.mark.slow
def test_script_exports_final_models_for_plain_transformers(tiny, tmp_path):  # noqa: F811
    output_dir = tmp_path / "run"
    result = run_script(tiny_argv(tiny, output_dir, "--quant", "binary", "--no-bwn_baseline",
                                  "--num_train_epochs", "1"), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    exported = sorted(path.name for path in (output_dir / "export").iterdir())
    assert exported == ["binary_a8_logits", "ternary_a8_logits"]
    for stage in exported:
        folder = output_dir / "export" / stage
        done = read_done(output_dir, stage)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "bert" and config["quantization_config"]["format"] == "packed"
        card = (folder / "README.md").read_text()
        assert done["bits"] in card and f"{done['metrics']['accuracy'] * 100:.2f}" in card
        sizes = json.loads((folder / "packed.json").read_text())["sizes"]
        assert f"{sizes['packed_bytes']} bytes" in card
        assert sizes["packed_bytes"] == done["size_bytes"]
        # Plain transformers: tokenizer and packed model from the folder; the dev accuracy is the stage's.
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
        assert isinstance(model.bert.encoder.layer[0].attention.self.query,
                          (triton_bq.PackedLinear, triton_bq.PackedSplitLinear))
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert tokenizer.unk_token_id not in tokenizer("the flight was good")["input_ids"]
        assert abs(dev_accuracy_of(folder, tiny) - done["metrics"]["accuracy"]) <= 1 / DEV_SIZE + 1e-9
        # The latent best/ folder loads the same way, with its tokenizer, and predicts what the packed model does.
        best = output_dir / stage / "best"
        latent = transformers.AutoModelForSequenceClassification.from_pretrained(best)
        inputs = transformers.AutoTokenizer.from_pretrained(best)(["the flight was good", "awful food"],
                                                                   padding=True, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(latent(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
    binary = transformers.AutoModelForSequenceClassification.from_pretrained(output_dir / "export" / exported[0])
    query = binary.bert.encoder.layer[0].attention.self.query
    # Binary distillation trains the two halves' input quantizers apart: each half is a 1-bit packed layer.
    assert {half.bits for half in query.modules() if isinstance(half, triton_bq.PackedLinear)} == {1}
    classifier = transformers.pipeline("text-classification", model=binary,
                                       tokenizer=transformers.AutoTokenizer.from_pretrained(output_dir / "export" /
                                                                                            exported[0]))
    assert classifier("the flight was good")[0]["label"] in set(binary.config.id2label.values())
