"""Hugging Face integration: triton_bq models load with plain ``transformers`` ``from_pretrained``.

``import triton_bq`` registers, through transformers' quantizer registry (``register_quantization_config`` /
``register_quantizer``, as transformers' own BitNet, HQQ and torchao integrations are built), the quantization
method ``"triton_bq"``: a config class, ``TritonBQConfig``, and an ``HfQuantizer`` that rebuilds our layers on the
skeleton model before the weights load. Then:

- ``AutoModelFor*.from_pretrained(full_precision_path, quantization_config=TritonBQConfig(QuantConfig(...)))``
  quantizes a full-precision checkpoint for QAT (optionally narrowed, ``width_plan``, and split, ``split``) after
  its weights load;
- a quantized model records its structure in ``model.config.quantization_config`` (``triton_bq.convert``), so
  ``model.save_pretrained(folder)`` writes it into ``config.json`` and ``AutoModelFor*.from_pretrained(folder)``
  rebuilds the same modules (latent, split, narrowed) and loads the same weights;
- a folder written by ``triton_bq.save_packed`` has a ``config.json`` too, and ``from_pretrained`` returns the
  packed inference model (its file is checked against the sha256 recorded in ``config.json``).

Loading a triton_bq folder is strict: a weight file whose keys do not fit the rebuilt model (keys missing or
unexpected), or whose checksum differs, raises ``ValueError`` naming the keys or the file, instead of the warning
and randomly initialized weights transformers gives otherwise.

Without ``import triton_bq`` transformers cannot know the method: it logs "Unknown quantization type, got
triton_bq ... we will skip the quantization" and loads the plain architecture, reporting the keys it could not place
(the latent weights of unsplit layers load into plain ``nn.Linear`` layers, which then run in full precision; split and
packed layers leave their full-precision weights randomly initialized). Import triton_bq first.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from safetensors import safe_open
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from triton_bq.convert import QUANT_METHOD, RECORD_VERSION, QuantConfig, quantize_
from triton_bq.export.format import build_modules
from triton_bq.export.io import verify_file
from triton_bq.nn.packed import PackedEmbedding, PackedLinear, PackedSplitLinear
from triton_bq.recipe.tws import split_ternary_to_binary
from triton_bq.recipe.width import shrink_width_

_PACKED = (PackedLinear, PackedSplitLinear, PackedEmbedding)


def _has_parameter(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    return isinstance(getattr(module, leaf, None), nn.Parameter)

__all__ = ["TritonBQConfig", "TritonBQHfQuantizer"]


def _quant_config_dict(quant_config) -> dict | None:
    if quant_config is None:
        return None
    if isinstance(quant_config, QuantConfig):
        return dataclasses.asdict(quant_config)
    if isinstance(quant_config, dict):
        return dataclasses.asdict(_to_quant_config(quant_config))
    raise TypeError(f"quant_config must be a QuantConfig, a dict of its fields or None, got "
                    f"{type(quant_config).__name__}")


def _to_quant_config(options: dict) -> QuantConfig:
    fields = {field.name for field in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"quant_config has unknown fields {unknown}; QuantConfig has {sorted(fields)}")
    options = dict(options)
    if options.get("asym_act_names") is not None:
        options["asym_act_names"] = tuple(options["asym_act_names"])
    return QuantConfig(**options)


@register_quantization_config(QUANT_METHOD)
class TritonBQConfig(QuantizationConfigMixin):
    """The Hugging Face quantization config of triton_bq models (``quant_method="triton_bq"``).

    To quantize a full-precision checkpoint for QAT, pass ``TritonBQConfig(QuantConfig(...))`` as
    ``quantization_config`` to ``from_pretrained``; after the weights load the model is narrowed (``width_plan``),
    quantized (``quantize_``) and split (``split``), in that order. A quantized model's saved ``config.json`` holds
    the other fields (``modules``: what rebuilds each quantized module; ``format``: ``"latent"`` or ``"packed"``),
    written by triton_bq, not by hand.

    Args:
        quant_config: a ``triton_bq.QuantConfig`` (or a dict of its fields).
        split: ``True`` splits every ternary layer (ternary weight splitting; needs a ternary ``quant_config``), a
            list of module / candidate names splits those (``split_ternary_to_binary(include=...)``); ``None``: none.
        width_plan: a width in (0, 1] (heads and FFN neurons kept by weight magnitude) or a plan
            (``triton_bq.recipe.width.width_plan``) applied before quantizing; ``None``: full width.
        modules, format, version, files, tied, packed_version: the record of a saved quantized model.
    """

    def __init__(self, quant_config: QuantConfig | dict | None = None, split: bool | list[str] | None = None,
                 width_plan: dict | float | None = None, modules: dict | None = None, format: str = "latent",
                 version: int = RECORD_VERSION, files: dict | None = None, tied: dict | None = None,
                 packed_version: int | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.quant_config = _quant_config_dict(quant_config)
        if split not in (None, False, True) and (isinstance(split, str) or not isinstance(split, (list, tuple))):
            raise ValueError(f"split must be None, True or a list of module names, got {split!r}")
        self.split = list(split) if isinstance(split, (list, tuple)) else (split or None)
        if width_plan is not None and not isinstance(width_plan, (dict, int, float)) or isinstance(width_plan, bool):
            raise ValueError(f"width_plan must be None, a width in (0, 1] or a plan dict, got {width_plan!r}")
        self.width_plan = width_plan
        if modules is not None and not isinstance(modules, dict):
            raise ValueError(f"modules must be a dict of module name -> entry, got {type(modules).__name__}")
        self.modules = modules
        if format not in ("latent", "packed"):
            raise ValueError(f"format must be 'latent' or 'packed', got {format!r}")
        self.format = format
        if version != RECORD_VERSION:
            raise ValueError(f"this triton_bq reads quantization records of version {RECORD_VERSION}, got "
                             f"{version!r} (saved by another triton_bq version)")
        self.version = version
        self.files = files
        self.tied = tied
        self.packed_version = packed_version
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"unknown TritonBQConfig fields {sorted(kwargs)}")

    @property
    def is_record(self) -> bool:
        """Whether this config describes a saved quantized model (``modules`` / a width plan) to rebuild."""
        return self.modules is not None

    def quantization(self) -> QuantConfig | None:
        """The ``QuantConfig`` to apply to a full-precision checkpoint, if any."""
        return None if self.quant_config is None else _to_quant_config(self.quant_config)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


def _checkpoint_keys(checkpoint_files) -> tuple[set[str], list[Path]]:
    keys: set[str] = set()
    paths = [Path(path) for path in checkpoint_files or ()]
    for path in paths:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), "pt") as handle:
                keys.update(handle.keys())
        except Exception as error:  # safetensors raises its own error types for malformed headers
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    return keys, paths


def _check_keys(model: nn.Module, stored: set[str], ignored: set[str], source: str) -> None:
    expected = set(model.state_dict().keys())
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(expected - stored - tied - ignored)
    unexpected = sorted(stored - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit the triton_bq model its config.json describes: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}. The "
            f"weights were saved from another structure (or changed); refusing to return randomly initialized weights"
        )


@register_quantizer(QUANT_METHOD)
class TritonBQHfQuantizer(HfQuantizer):
    """Rebuilds triton_bq layers on the model transformers builds (``TritonBQConfig``; module docstring).

    A saved triton_bq model (``pre_quantized``: its ``config.json`` holds the record) is rebuilt on the meta-device
    skeleton before the weights load, and its weight files are checked against the rebuilt model (keys, and the
    sha256 of packed files). A full-precision checkpoint loads first and is quantized afterwards.
    """

    requires_calibration = False
    quantization_config: TritonBQConfig

    def validate_environment(self, *args, **kwargs):
        config = self.quantization_config
        if self.pre_quantized and not config.is_record:
            raise ValueError("config.json holds a triton_bq quantization config without modules: it was not written "
                             "by triton_bq (save a quantized model with save_pretrained or triton_bq.save_packed)")
        if not self.pre_quantized and config.quant_config is None:
            raise ValueError("quantization_config=TritonBQConfig(...) for a full-precision checkpoint needs a "
                             "quant_config (triton_bq.QuantConfig) to quantize it with")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        config = self.quantization_config
        # The rebuild steps record the structure as they go; the saved record is restored after loading.
        model.config.__dict__.pop("quantization_config", None)
        if isinstance(config.width_plan, dict):
            shrink_width_(model, config.width_plan)
        rebuilt = build_modules(model, config.modules, source="the quantization_config of config.json")
        if rebuilt is not model:
            raise ValueError("a triton_bq record that replaces the whole model cannot load with from_pretrained")
        # The packed layers' tensors all come from the checkpoint (checked below). A family's _init_weights may reach
        # into a child's .weight (GPT-2's attention and MLP init c_proj.weight), which a packed layer has not: such a
        # parent is skipped too, unless it owns buffers that only its init fills (BERT's position_ids).
        for module in model.modules():
            packed_child = any(isinstance(child, _PACKED) for child in module.children())
            if isinstance(module, _PACKED) or (packed_child and not list(module.buffers(recurse=False))):
                module._is_hf_initialized = True
        # transformers ties parameters by name (lm_head.weight -> wte.weight); packed layers have no .weight, and the
        # packed file ties what it shares itself (config.tied, restored after loading).
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            model.all_tied_weights_keys = {key: value for key, value in tied.items()
                                           if _has_parameter(model, key) and _has_parameter(model, value)}
        stored, paths = _checkpoint_keys(checkpoint_files)
        if config.files:
            for path in paths:
                expected = config.files.get(path.name)
                if expected is None:
                    raise ValueError(f"{path} is not among the files config.json records ({sorted(config.files)})")
                verify_file(path, expected)
        if any(path.suffix == ".safetensors" for path in paths):
            _check_keys(model, stored, set(config.tied or {}), ", ".join(str(path) for path in paths))
        model.config.quantization_config = config
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            # Tensors written once for tied keys were loaded under their first key.
            for key, first in (config.tied or {}).items():
                owner, _, leaf = key.rpartition(".")
                first_owner, _, first_leaf = first.rpartition(".")
                tensor = getattr(model.get_submodule(first_owner), first_leaf)
                setattr(model.get_submodule(owner), leaf, tensor)
            # The checksums were of the files just read: a model saved again writes other files.
            loaded = copy.deepcopy(config)
            loaded.files = None
            self.quantization_config = loaded
            model.config.quantization_config = loaded
            return model
        model.config.__dict__.pop("quantization_config", None)
        width = config.width_plan
        if width is not None and width != 1:
            shrink_width_(model, width)
        quantize_(model, config.quantization())
        if config.split:
            split_ternary_to_binary(model, include=None if config.split is True else config.split)
        record = model.config.quantization_config
        saved = TritonBQConfig(**(record if isinstance(record, dict) else record.to_dict()))
        saved.split, saved.quant_config = config.split, config.quant_config
        self.quantization_config = saved
        model.config.quantization_config = saved
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return self.quantization_config.format == "latent"

    @property
    def is_qat_trainable(self) -> bool:
        return self.quantization_config.format == "latent"

