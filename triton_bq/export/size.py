"""True model size: bytes as stored packed, per component, next to the fp32 size of the same parameters.

The stored size is exactly the tensor payload that ``triton_bq.save_packed`` writes (``triton_bq.export.format``; a test
pins ``model_size_report(model).stored_bytes == packed_size_bytes(model)``), computed from shapes and layer types only,
so it also works on meta-device models:

- binary weight (``bwn``): 1 bit per weight; ternary weight (``twn``/``lat``): 2 bits per weight; each row of a
  matrix (or embedding table) packed into whole int32 words: ``rows * ceil(columns * bits / 32) * 4`` bytes.
- scales: fp32, one per tensor or one per row (``granularity``; embeddings are row-wise). Thresholds are not stored.
- a split layer (``SplitBinaryLinear``/``SplitBinaryEmbedding``) stores two binary matrices and their scales, one bias
  (``bias1 + bias2``, merged at export) and its activation quantizer once when both halves quantize their input
  identically (always true right after splitting), else both.
- everything else at its own dtype (fp32 in practice): unquantized weights (position/token-type embeddings, the
  classifier head), biases, normalization parameters, activation clips / LSQ steps, persistent buffers (e.g. the LSQ
  ``initialized`` flag). Non-persistent buffers such as BERT's ``position_ids`` are rebuilt at load.

Parameters are counted once each, so tied weights count once; a Parameter that one module quantizes and another
uses in full precision (a quantized word embedding tied to an LM head) is stored once packed and once in fp32.
``fp32_bytes`` is ``4 * numel`` of the model's own Parameters (its latent checkpoint in fp32: both halves of a split
layer, both biases), with no scales, plus the persistent buffers at their own size. MB means 10^6 bytes, MiB 2^20.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import transformers
from torch import nn

from triton_bq.bitpack import packed_bytes, scale_count, weight_bits
from triton_bq.convert import quantize_
from triton_bq.export.format import packed_parts
from triton_bq.nn.activation import ActQuantizer
from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import QuantLinear
from triton_bq.nn.packed import PackedEmbedding, PackedLinear, act_quantizer_entry, same_act_quantizer
from triton_bq.nn.split import SplitBinaryEmbedding, SplitBinaryLinear
from triton_bq.recipe.tws import split_ternary_to_binary
from triton_bq.recipe.width import shrink_width_

__all__ = [
    "COMPONENTS",
    "SizeEntry",
    "SizeReport",
    "fp32_size_bytes",
    "model_size_report",
    "model_size_report_from_config",
    "model_sizes",
    "packed_sizes",
    "packed_size_bytes",
    "size_report",
]

FP32_BYTES = 4
COMPONENTS = (
    "binary weights",
    "ternary weights",
    "weight scales",
    "fp32 linear weights",
    "fp32 embeddings",
    "biases",
    "normalization",
    "activation quantizers",
    "other",
)
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "KiB": 2**10, "MiB": 2**20}


@dataclasses.dataclass(frozen=True)
class SizeEntry:
    """One stored item: ``name`` (Parameter name, or ``<module>.weight_scale``), its ``component``, ``numel`` values at
    ``bits`` bits each, ``stored_bytes`` packed, and ``fp32_bytes`` (4 x numel of the Parameters it stands for)."""

    name: str
    component: str
    numel: int
    bits: int
    stored_bytes: int
    fp32_bytes: int


@dataclasses.dataclass
class SizeReport:
    """Entries of a model's stored size, with per-component sums and totals."""

    entries: list[SizeEntry]

    @property
    def stored_bytes(self) -> int:
        """Total bytes as stored packed."""
        return sum(entry.stored_bytes for entry in self.entries)

    @property
    def fp32_bytes(self) -> int:
        """Total bytes of the same Parameters in fp32."""
        return sum(entry.fp32_bytes for entry in self.entries)

    @property
    def ratio(self) -> float:
        """``fp32_bytes / stored_bytes``."""
        return self.fp32_bytes / self.stored_bytes if self.stored_bytes else math.nan

    def components(self) -> dict[str, dict[str, int]]:
        """component -> ``{"numel", "stored_bytes", "fp32_bytes"}`` in ``COMPONENTS`` order (empty ones left out)."""
        sums = {name: dict(numel=0, stored_bytes=0, fp32_bytes=0) for name in COMPONENTS}
        for entry in self.entries:
            row = sums[entry.component]
            row["numel"] += entry.numel
            row["stored_bytes"] += entry.stored_bytes
            row["fp32_bytes"] += entry.fp32_bytes
        return {name: row for name, row in sums.items() if row["numel"]}

    def by_part(self, parts: Mapping[str, Sequence[str]], rest: str = "rest") -> dict[str, dict[str, int]]:
        """Stored bytes and low-bit weight counts per part of the model: ``parts`` maps a part's name to the entry
        name prefixes it holds (e.g. ``{"encoder": ("bert.encoder.",)}``); entries under none of them go to
        ``rest``. Each part: ``{"stored_bytes", "binary_weights", "ternary_weights"}``, in ``parts`` order then
        ``rest``; the parts' bytes sum to ``stored_bytes``."""
        if rest in parts:
            raise ValueError(f"rest={rest!r} is also a name in parts")
        sums = {name: dict(stored_bytes=0, binary_weights=0, ternary_weights=0) for name in (*parts, rest)}
        for entry in self.entries:
            part = next((name for name, prefixes in parts.items()
                         if any(entry.name.startswith(prefix) for prefix in prefixes)), rest)
            sums[part]["stored_bytes"] += entry.stored_bytes
            if entry.component == "binary weights":
                sums[part]["binary_weights"] += entry.numel
            elif entry.component == "ternary weights":
                sums[part]["ternary_weights"] += entry.numel
        return sums

    def table(self, unit: str = "MiB") -> str:
        """A Markdown table: component, values, fp32 size, stored size (in ``unit``: B, KB, MB, KiB, MiB), total."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {tuple(UNITS)}, got {unit!r}")
        scale = UNITS[unit]
        digits = 0 if unit == "B" else 3
        lines = [f"| component | values | fp32 {unit} | stored {unit} |", "|---|---:|---:|---:|"]
        for name, row in self.components().items():
            lines.append(f"| {name} | {row['numel']:,} | {row['fp32_bytes'] / scale:,.{digits}f} | "
                         f"{row['stored_bytes'] / scale:,.{digits}f} |")
        total = sum(entry.numel for entry in self.entries)
        lines.append(f"| **total** | {total:,} | {self.fp32_bytes / scale:,.{digits}f} | "
                     f"{self.stored_bytes / scale:,.{digits}f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fp32_bytes(tensor: torch.Tensor) -> int:
    """Bytes in the fp32 checkpoint: 4 per floating-point value, other dtypes at their own size."""
    return tensor.numel() * (FP32_BYTES if tensor.is_floating_point() else tensor.element_size())


class _Accountant:
    def __init__(self):
        self.entries: list[SizeEntry] = []
        self.seen: set[int] = set()
        # A Parameter quantized in one module and used in full precision by another (a word embedding tied to the
        # LM head) is stored twice: packed for the first, fp32 for the second. Each is counted once.
        self.seen_fp32: set[int] = set()
        self.seen_packed: set[int] = set()

    def fresh(self, *parameters) -> bool:
        return all(parameter is not None and id(parameter) not in self.seen for parameter in parameters)

    def fp32(self, name: str, parameter: nn.Parameter, component: str) -> None:
        """A full-precision Parameter, unless counted already (in fp32, or otherwise and not packed)."""
        if parameter is None or id(parameter) in self.seen_fp32:
            return
        if id(parameter) in self.seen and id(parameter) not in self.seen_packed:
            return
        self.seen.add(id(parameter))
        self.seen_fp32.add(id(parameter))
        numel = parameter.numel()
        self.entries.append(SizeEntry(name, component, numel, 32, FP32_BYTES * numel, FP32_BYTES * numel))

    def quantized(self, prefix: str, module: nn.Module) -> None:
        """The weight of a ``QuantLinear``/``QuantEmbedding`` at its method's bits, plus its fp32 scales."""
        weight = module.weight
        if module.weight_method is None:
            component = "fp32 embeddings" if isinstance(module, QuantEmbedding) else "fp32 linear weights"
            self.fp32(f"{prefix}weight", weight, component)
            return
        if weight is None or id(weight) in self.seen_packed:
            return
        self.seen.add(id(weight))
        self.seen_packed.add(id(weight))
        bits = weight_bits(module.weight_method)
        component = "binary weights" if bits == 1 else "ternary weights"
        numel = weight.numel()
        # Packed as [out_features, in_features] rows (a Conv1D's weight Parameter is stored transposed).
        rows, columns = (module.out_features, module.in_features) if isinstance(module, QuantLinear) else weight.shape
        self.entries.append(
            SizeEntry(f"{prefix}weight", component, numel, bits, packed_bytes(rows, columns, bits), FP32_BYTES * numel)
        )
        scales = scale_count(rows, module.granularity)
        self.entries.append(SizeEntry(f"{prefix}weight_scale", "weight scales", scales, 32, FP32_BYTES * scales, 0))

    def buffer(self, name: str, buffer: torch.Tensor, component: str) -> None:
        """A persistent buffer, stored at its own dtype."""
        if not self.fresh(buffer):
            return
        self.seen.add(id(buffer))
        numel, size = buffer.numel(), buffer.element_size()
        self.entries.append(SizeEntry(name, component, numel, 8 * size, numel * size, _fp32_bytes(buffer)))

    def not_stored(self, prefix: str, module: nn.Module, component: str) -> None:
        """Every tensor of ``module`` with 0 stored bytes (a split layer's second activation quantizer, stored once
        by the first half); they keep their fp32 bytes."""
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if self.fresh(tensor):
                self.seen.add(id(tensor))
                self.entries.append(SizeEntry(f"{prefix}{name}", component, tensor.numel(), 0, 0, _fp32_bytes(tensor)))

    def merged_bias(self, prefix: str, module: SplitBinaryLinear) -> None:
        bias1, bias2 = module.bias1, module.bias2
        if bias1 is None or not self.fresh(bias1, bias2):
            return
        self.seen.update((id(bias1), id(bias2)))
        numel = bias1.numel()
        self.entries.append(
            SizeEntry(f"{prefix}bias", "biases", numel, 32, FP32_BYTES * numel, FP32_BYTES * (numel + bias2.numel()))
        )


def _is_normalization(module: nn.Module) -> bool:
    norms = tuple(cls for cls in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if cls is not None)
    return isinstance(module, norms) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _shared_act_quantizer(module: SplitBinaryLinear) -> bool:
    """Whether the export stores one activation quantizer for both halves (``triton_bq.packed.pack_split_linear``).

    On the meta device the values are unknown; the halves are then taken as split, i.e. identical.
    """
    first, second = module.half1.act_quantizer, module.half2.act_quantizer
    if first is None or second is None:
        return first is None and second is None
    if any(tensor.is_meta for quantizer in (first, second) for tensor in quantizer.state_dict().values()):
        return act_quantizer_entry(first) == act_quantizer_entry(second)
    return same_act_quantizer(first, second)


def model_size_report(model: nn.Module) -> SizeReport:
    """The stored size of ``model`` (module docstring for the convention), entry by entry.

    Works on real and meta-device models (only shapes and layer types are read).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    accountant = _Accountant()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (SplitBinaryLinear, SplitBinaryEmbedding)):
            half1, half2 = module.halves()
            for half_name, half in (("half1", half1), ("half2", half2)):
                if isinstance(half, (QuantLinear, QuantEmbedding)):
                    accountant.quantized(f"{prefix}{half_name}.", half)
            if isinstance(module, SplitBinaryLinear):
                accountant.merged_bias(prefix, module)
                if _shared_act_quantizer(module) and module.half2.act_quantizer is not None:
                    accountant.not_stored(f"{prefix}half2.act_quantizer.", module.half2.act_quantizer,
                                          "activation quantizers")
            continue
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            accountant.quantized(prefix, module)
        for name, parameter in module.named_parameters(recurse=False):
            if name == "weight" and isinstance(module, (QuantLinear, QuantEmbedding)):
                continue
            if isinstance(module, ActQuantizer):
                component = "activation quantizers"
            elif _is_normalization(module):
                component = "normalization"
            elif name == "bias":
                component = "biases"
            elif isinstance(module, nn.Embedding) and name == "weight":
                component = "fp32 embeddings"
            elif isinstance(module, nn.Linear) and name == "weight":
                component = "fp32 linear weights"
            else:
                component = "other"
            accountant.fp32(f"{prefix}{name}", parameter, component)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                component = "activation quantizers" if isinstance(module, ActQuantizer) else "other"
                accountant.buffer(f"{prefix}{name}", buffer, component)
    return SizeReport(accountant.entries)


def model_size_report_from_config(
    config,
    *,
    quant_config=None,
    split: bool | Iterable[str] = False,
    width: float = 1.0,
    model_factory: Callable | None = None,
) -> SizeReport:
    """``model_size_report`` of a model built from a Hugging Face config on the meta device (no weights allocated).

    Args:
        config: e.g. ``transformers.BertConfig(num_labels=2)``.
        quant_config: a ``triton_bq.QuantConfig`` applied with ``triton_bq.quantize_`` (``None``: full precision).
        split: ``True`` applies full ternary weight splitting (``split_ternary_to_binary``); an iterable of module or
            candidate names splits those and binarizes the other ternary layers; ``False`` leaves the model as is.
        width: keep this fraction of the attention heads and FFN neurons of every layer first
            (``triton_bq.width.shrink_width_``; BinaryBERT splits a half-width ternary model: ``width=0.5``).
        model_factory: ``config -> model``; default ``transformers.AutoModelForSequenceClassification.from_config``.
    """
    if model_factory is None:
        model_factory = transformers.AutoModelForSequenceClassification.from_config
    with torch.device("meta"):
        model = model_factory(config)
    if width != 1.0:
        shrink_width_(model, width)
    if quant_config is not None:
        quantize_(model, quant_config)
    if split is True:
        split_ternary_to_binary(model)
    elif split is not False:
        split_ternary_to_binary(model, include=split)
    return model_size_report(model)


def packed_sizes(state: dict[str, torch.Tensor], packed: dict[str, nn.Module]) -> dict:
    layers = {
        f"{name}.{inner}" if name and inner else name or inner: layer
        for name, module in packed.items()
        for inner, layer in module.named_modules()
        if isinstance(layer, (PackedLinear, PackedEmbedding))
    }
    packed_bytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    fp32_bytes = 0
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf == "packed_weight":
            fp32_bytes += tensor.shape[0] * tensor.shape[1] * layer.packed.in_features * 4
        elif layer is None or leaf != "weight_scale":
            fp32_bytes += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
    return {"packed_bytes": packed_bytes, "fp32_bytes": fp32_bytes}


def model_sizes(model: nn.Module) -> dict:
    """``{"packed_bytes", "fp32_bytes"}``: the tensor payload ``save_packed`` writes, and the latent model in float32
    (each packed ``[N, K]`` matrix at 4 bytes per weight, both halves of a split layer, no scales; every other floating
    tensor at 4 bytes per element, other tensors at their own size)."""
    return packed_sizes(*packed_parts(model))


def packed_size_bytes(model: nn.Module) -> int:
    """True size in bytes of ``model`` exported with ``triton_bq.save_packed`` (the tensor payload of the file).

    Quantized layers count their packed codes (1 bit per binary weight, 2 bits per ternary weight, padded to whole
    int32 words along K), float32 scales, bias and activation-quantizer tensors; every other tensor of the state
    dict counts at its stored dtype. Works on a quantized training model and on a packed one.
    """
    return model_sizes(model)["packed_bytes"]


def fp32_size_bytes(model: nn.Module) -> int:
    """Size in bytes of the latent model in float32: every quantized ``[N, K]`` matrix at 4 bytes per weight (both
    halves of a split-binary layer; no scales) and every other floating-point tensor at 4 bytes per element (other
    tensors at their own size)."""
    return model_sizes(model)["fp32_bytes"]


def size_report(model: nn.Module) -> dict:
    """``{"packed_bytes", "fp32_bytes", "compression"}`` with ``compression = fp32_bytes / packed_bytes``."""
    sizes = model_sizes(model)
    return dict(sizes, compression=sizes["fp32_bytes"] / sizes["packed_bytes"])
