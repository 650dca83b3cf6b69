"""Packed folders are checked at load: every damaged, missing or malformed file raises an error naming it."""

import json

import pytest
import torch
from tiny_bert import bert_inputs, tiny_bert

import triton_bq
from triton_bq import QuantConfig
from triton_bq.export.format import MANIFEST_NAME, WEIGHTS_NAME


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="bwn"))
    directory = tmp_path_factory.mktemp("packed")
    triton_bq.save_packed(model, directory)
    return model, directory


def damaged_copy(directory, tmp_path):
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def test_manifest_records_size_and_sha256(exported):
    model, directory = exported
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    record = manifest["files"][WEIGHTS_NAME]
    assert record["bytes"] == (directory / WEIGHTS_NAME).stat().st_size
    assert len(record["sha256"]) == 64
    loaded = triton_bq.load_packed(directory)
    inputs = bert_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_overwritten_tensor_bytes_raise(exported, tmp_path):
    directory = damaged_copy(exported[1], tmp_path)
    weights = directory / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: sha256 .* differs"):
        triton_bq.load_packed(directory)


def test_truncated_weights_raise(exported, tmp_path):
    directory = damaged_copy(exported[1], tmp_path)
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is \d+ bytes, the manifest records \d+: .*truncated"):
        triton_bq.load_packed(directory)


def test_truncated_manifest_raises(exported, tmp_path):
    directory = damaged_copy(exported[1], tmp_path)
    manifest = directory / MANIFEST_NAME
    manifest.write_text(manifest.read_text()[:200])
    with pytest.raises(ValueError, match=r"packed\.json is not valid JSON"):
        triton_bq.load_packed(directory)


def test_manifest_without_files_raises(exported, tmp_path):
    directory = damaged_copy(exported[1], tmp_path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    del manifest["files"]
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lists no model.safetensors"):
        triton_bq.load_packed(directory)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, MANIFEST_NAME])
def test_missing_file_raises(exported, tmp_path, name):
    directory = damaged_copy(exported[1], tmp_path)
    (directory / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.") + " is missing"):
        triton_bq.load_packed(directory)


def test_malformed_safetensors_with_matching_record_raises(exported, tmp_path):
    """A file whose checksum was recorded but that is no safetensors file (written by hand) is named."""
    directory = damaged_copy(exported[1], tmp_path)
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(b"not a safetensors file")
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["files"][WEIGHTS_NAME] = triton_bq.export.io.file_record(weights)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        triton_bq.load_packed(directory)


def test_latent_folder_points_to_from_pretrained(tmp_path):
    model = triton_bq.quantize_(tiny_bert(), QuantConfig(weight_method="bwn"))
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="latent .*from_pretrained"):
        triton_bq.load_packed(tmp_path)


def test_not_a_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        triton_bq.load_packed(tmp_path / "absent")
