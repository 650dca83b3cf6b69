"""Export and load whole packed models: ``save_packed`` writes a model folder, ``load_packed`` rebuilds the inference
model from it (see ``triton_bq.export.format`` for what the folder holds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from triton_bq.export.format import FORMAT, FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME, manifest_modules, packed_parts
from triton_bq.export.size import packed_sizes
from triton_bq.nn.attention import quantize_attention
from triton_bq.nn.linear import QuantLinear
from triton_bq.nn.packed import PackedEmbedding, PackedLinear, PackedSplitLinear, act_quantizer_from_entry

__all__ = ["load_packed", "save_packed"]


def save_packed(model: nn.Module, path: str | os.PathLike) -> dict:
    """Export a quantized (or already packed) model to the directory ``path``: ``model.safetensors`` + ``packed.json``.

    Returns the sizes written to the manifest: ``packed_bytes`` (tensor payload of the file: 1 bit per binary
    weight, 2 bits per ternary weight padded to whole int32 words along K, float32 scales, every other tensor at its
    dtype) and ``fp32_bytes`` (see ``model_sizes``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state, packed = packed_parts(model)
    config = getattr(model, "config", None)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "config": config.to_dict() if callable(getattr(config, "to_dict", None)) else None,
        "modules": manifest_modules(model, packed),
        "sizes": packed_sizes(state, packed),
    }
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage: write independent contiguous CPU copies.
    save_file({key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in state.items()},
              str(directory / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dict(manifest["sizes"])


def _packed_linear_from_entry(entry: dict, device, backend: str) -> PackedLinear:
    return PackedLinear(
        entry["in_features"], entry["out_features"], entry["bits"], entry["parts"], entry["granularity"],
        entry["bias"], act_quantizer_from_entry(entry["act"]), device=device, backend=backend,
    )


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
        config = transformers.AutoConfig.for_model(options.pop("model_type"), **options)
    elif not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(
            f"model_or_config must be an nn.Module, a PretrainedConfig or None, got {type(config).__name__}"
        )
    return architecture(config)


def load_packed(
    path: str | os.PathLike, model_or_config=None, *, device=None, backend: str = "auto"
) -> nn.Module:
    """Rebuild the inference model saved by ``save_packed``.

    ``model_or_config``: the full-precision model (any ``nn.Module`` with the original, unquantized structure, whose
    weights are then overwritten), a Hugging Face ``PretrainedConfig`` (the saved architecture is built from it) or
    ``None`` (the saved config). Quantized attention is re-applied, packed layers become ``PackedLinear`` /
    ``PackedEmbedding`` (with ``backend``), and the state dict is loaded strictly. Returns the model in eval mode.
    """
    directory = Path(path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{directory / MANIFEST_NAME} is not a {FORMAT} v{FORMAT_VERSION} manifest: "
                         f"format={manifest.get('format')!r}, version={manifest.get('version')!r}")
    model = _build_model(manifest, model_or_config)
    if device is not None:
        model.to(device)
    reference_tensor = next(iter(model.state_dict().values()), None)
    target_device = reference_tensor.device if reference_tensor is not None else torch.device("cpu")
    entries = manifest["modules"]
    # Attention first: its quantizers are added while query/key/value are still nn.Linear.
    for name, entry in entries.items():
        if entry["type"] == "QuantSelfAttention":
            quantize_attention(model.get_submodule(name), entry["act_bits"])
    for name, entry in entries.items():
        kind = entry["type"]
        if kind == "PackedLinear":
            module = _packed_linear_from_entry(entry, target_device, backend)
        elif kind == "PackedSplitLinear":
            module = PackedSplitLinear(*(_packed_linear_from_entry(entry[half], target_device, backend)
                                         for half in ("half1", "half2")))
        elif kind == "PackedEmbedding":
            module = PackedEmbedding(
                entry["num_embeddings"], entry["embedding_dim"], entry["bits"], entry["padding_idx"],
                device=target_device, dtype=getattr(torch, entry["dtype"]), parts=entry["parts"],
            )
        elif kind == "QuantLinear":
            options = {key: entry[key] for key in ("weight_method", "granularity", "ste", "act_bits", "act_method",
                                                   "act_signed")}
            module = QuantLinear.from_linear(model.get_submodule(name), **options)
        elif kind == "QuantSelfAttention":
            continue
        else:
            raise ValueError(f"unknown module type {kind!r} for {name!r} in {directory / MANIFEST_NAME}")
        model.set_submodule(name, module.to(target_device))
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(target_device)), strict=True)
    return model.eval()
