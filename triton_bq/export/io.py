"""Export and load whole packed models: ``save_packed`` writes a model folder, ``load_packed`` rebuilds the inference
model from it (see ``triton_bq.export.format`` for what the folder holds).

The folder is also a Hugging Face model folder: ``config.json`` (the model's config with ``model_type`` and, under
``quantization_config``, the packed modules) beside ``model.safetensors``, so that after ``import triton_bq``
``AutoModelFor*.from_pretrained(folder)`` returns the same packed model (``triton_bq.export.hf``). ``packed.json``
records each file's size and sha256; loading checks them and names the file and what is wrong.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from triton_bq.convert import QUANT_METHOD, quantization_record
from triton_bq.export.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    build_modules,
    manifest_modules,
    packed_parts,
    tied_keys,
)
from triton_bq.export.size import packed_sizes

__all__ = ["CONFIG_NAME", "file_record", "load_packed", "read_json", "save_packed", "verify_file"]

CONFIG_NAME = "config.json"
_CHUNK = 1 << 20


def file_record(path: Path) -> dict:
    """``{"bytes", "sha256"}`` of the file ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_file(path: Path, expected: dict) -> None:
    """Raise unless the file ``path`` exists with the size and sha256 that ``expected`` (``file_record``) records."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (the packed manifest lists it)")
    size = path.stat().st_size
    if size != expected["bytes"]:
        state = "truncated" if size < expected["bytes"] else "longer than written"
        raise ValueError(f"{path} is {size} bytes, the manifest records {expected['bytes']}: the file is {state}")
    actual = file_record(path)["sha256"]
    if actual != expected["sha256"]:
        raise ValueError(f"{path}: sha256 {actual} differs from the manifest's {expected['sha256']}: the file was "
                         "changed or damaged after it was written")


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a missing, unreadable or malformed file raises an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {what}")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is truncated or damaged") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _hf_config(model: nn.Module, state: dict, tied: dict) -> transformers.PretrainedConfig | None:
    """The config written as ``config.json``: the model's, with the packed modules as its quantization config, its
    architecture, and word embeddings untied when the tied source was packed (the head keeps its own fp32 copy)."""
    config = getattr(model, "config", None)
    if not isinstance(config, transformers.PretrainedConfig):
        return None
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    tied_sources = getattr(model, "all_tied_weights_keys", None) or {}
    if any(source not in state and target in state for target, source in tied_sources.items()):
        config.tie_word_embeddings = False
        text_config = config.get_text_config(decoder=True)
        if text_config is not config and hasattr(text_config, "tie_word_embeddings"):
            text_config.tie_word_embeddings = False
    return config


def save_packed(model: nn.Module, path: str | os.PathLike) -> dict:
    """Export a quantized (or already packed) model to the directory ``path``: ``model.safetensors``,
    ``packed.json`` and, for a Hugging Face model, ``config.json`` (a transformers model folder: after
    ``import triton_bq``, ``AutoModelFor*.from_pretrained(path)`` loads the packed model; ``load_packed`` does too).

    A tensor shared by several state-dict keys (tied weights) is written once, under its first key. Returns the sizes
    written to the manifest: ``packed_bytes`` (tensor payload of the file: 1 bit per binary weight, 2 bits per ternary
    weight padded to whole int32 words along K, float32 scales, every other tensor at its dtype) and ``fp32_bytes``
    (see ``model_sizes``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state, packed = packed_parts(model)
    tied = tied_keys(state)
    state = {key: tensor for key, tensor in state.items() if key not in tied}
    modules = manifest_modules(model, packed)
    config = _hf_config(model, state, tied)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "config": config.to_dict() if config is not None else None,
        "modules": modules,
        "tied": tied,
        "sizes": packed_sizes(state, packed),
    }
    if manifest["config"] is not None:
        manifest["config"].pop("quantization_config", None)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage: write independent contiguous CPU copies.
    save_file({key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in state.items()},
              str(directory / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
    manifest["files"] = {WEIGHTS_NAME: file_record(directory / WEIGHTS_NAME)}
    if config is not None:
        record = quantization_record(model)
        record.update(format="packed", modules=modules, tied=tied, files=manifest["files"],
                      packed_version=FORMAT_VERSION)
        config.quantization_config = record
        config.save_pretrained(directory)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dict(manifest["sizes"])


def _build_model(manifest: dict, model_or_config) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    architecture = getattr(transformers, manifest.get("architecture") or "", None)
    if architecture is None:
        raise ValueError(
            f"cannot build architecture {manifest.get('architecture')!r} from transformers: pass the full-precision "
            "model (an nn.Module of the same structure) as model_or_config"
        )
    config = model_or_config
    if config is None:
        if manifest.get("config") is None:
            raise ValueError("the manifest has no config: pass model_or_config")
        options = dict(manifest["config"])
        options.pop("quantization_config", None)
        config = transformers.AutoConfig.for_model(options.pop("model_type"), **options)
    elif not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(
            f"model_or_config must be an nn.Module, a PretrainedConfig or None, got {type(config).__name__}"
        )
    return architecture(config)


def read_manifest(directory: Path) -> dict:
    """The checked ``packed.json`` of ``directory``, after verifying every file it lists."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file() and (directory / CONFIG_NAME).is_file():
        try:
            record = json.loads((directory / CONFIG_NAME).read_text()).get("quantization_config") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            record = {}
        if record.get("quant_method") == QUANT_METHOD:
            raise FileNotFoundError(
                f"{manifest_path} is missing: {directory} holds a latent (training) triton_bq model; load it with "
                "transformers.AutoModelFor<Task>.from_pretrained after import triton_bq, and export it with "
                "triton_bq.save_packed"
            )
    manifest = read_json(manifest_path, f"{directory} is not a folder written by triton_bq.save_packed")
    if manifest.get("format") != FORMAT or manifest.get("version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{manifest_path} is not a {FORMAT} v{FORMAT_VERSION} manifest: "
                         f"format={manifest.get('format')!r}, version={manifest.get('version')!r}")
    missing = [key for key in ("modules", "architecture") if key not in manifest]
    if missing:
        raise ValueError(f"{manifest_path} lacks {missing}: the manifest is incomplete")
    if manifest["version"] == 1:
        warnings.warn(f"{manifest_path} is a v1 manifest without checksums: its files are not verified",
                      stacklevel=3)
        if not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory / WEIGHTS_NAME} is missing (the packed manifest lists it)")
    else:
        files = manifest.get("files")
        if not isinstance(files, dict) or WEIGHTS_NAME not in files:
            raise ValueError(f"{manifest_path} lists no {WEIGHTS_NAME} under 'files': the manifest is incomplete")
        for name, expected in files.items():
            verify_file(directory / name, expected)
    return manifest


def load_weights(path: Path, device) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; a malformed file raises an error naming it."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error


def load_packed(
    path: str | os.PathLike, model_or_config=None, *, device=None, backend: str = "auto"
) -> nn.Module:
    """Rebuild the inference model saved by ``save_packed``.

    ``model_or_config``: the full-precision model (any ``nn.Module`` with the original, unquantized structure, whose
    weights are then overwritten), a Hugging Face ``PretrainedConfig`` (the saved architecture is built from it) or
    ``None`` (the saved config). Every file is checked against the sizes and sha256 the manifest records (a missing,
    truncated, changed or malformed file raises an error naming it). Quantized attention is re-applied, packed layers
    become ``PackedLinear`` / ``PackedEmbedding`` (with ``backend``), tied keys written once are filled from their
    first key, and the state dict is loaded strictly. Returns the model in eval mode.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    manifest = read_manifest(directory)
    model = _build_model(manifest, model_or_config)
    if device is not None:
        model.to(device)
    reference_tensor = next(iter(model.state_dict().values()), None)
    target_device = reference_tensor.device if reference_tensor is not None else torch.device("cpu")
    model = build_modules(model, manifest["modules"], device=target_device, backend=backend,
                          source=str(directory / MANIFEST_NAME))
    state = load_weights(directory / WEIGHTS_NAME, target_device)
    for key, first in (manifest.get("tied") or {}).items():
        if first not in state:
            raise ValueError(f"{directory / MANIFEST_NAME}: tied key {key!r} refers to {first!r}, which "
                             f"{directory / WEIGHTS_NAME} lacks")
        state[key] = state[first]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not fit the model the manifest describes: "
                         f"{error}") from error
    return model.eval()
