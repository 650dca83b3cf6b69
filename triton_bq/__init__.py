"""triton_bq: fused Triton kernels and the BinaryBERT / TernaryBERT recipe for 1-bit and 2-bit QAT.

Public API (everything else is private):

- Layers: ``QuantLinear``, ``BinaryLinear``, ``TernaryLinear``, ``QuantEmbedding``, ``ActQuantizer``.
- Module swap: ``QuantConfig``, ``quantize_``, ``dequantize_``.
- Functional ops: ``quant_linear`` (options in one ``QuantOptions``), ``quant_embedding``.
- Loss-aware ternarization: ``attach_optimizer``; ``second_moments`` / ``load_second_moments`` save and restore
  what it quantizes with.
- Ternary weight splitting (BinaryBERT): ``split_ternary_to_binary``, ``SplitBinaryLinear``,
  ``SplitBinaryEmbedding``; adaptive splitting: ``split_candidates``, ``split_costs``,
  ``measure_split_sensitivity``, ``choose_splits``.
- Half-width students (heads and FFN neurons kept by importance): ``shrink_width_``.
- Distillation: ``DistillationLoss``, ``distill_loss``, ``record_attention_scores``, ``capture_attention_scores``.
- Hugging Face: ``TritonBQConfig`` (registered with transformers on import: ``from_pretrained`` quantizes a
  full-precision checkpoint with it, and loads what ``save_pretrained`` / ``save_packed`` wrote).
- True size and packed inference: ``model_size_report``, ``pack_model``, ``save_packed``, ``load_packed``,
  ``PackedLinear``, ``PackedSplitLinear``, ``PackedEmbedding``, ``packed_linear``.
- Modules for the details (layers in ``docs/architecture.md``): ``triton_bq.reference`` (pure-PyTorch quantizers,
  the single source of truth), ``triton_bq.ops``, ``triton_bq.nn``, ``triton_bq.arch``, ``triton_bq.recipe``
  (``tws``, ``adaptive``, ``width``, ``distill``), ``triton_bq.export`` (``format``, ``size``, ``io``) and
  ``triton_bq.bitpack`` (bit formats).
"""

from triton_bq import reference
from triton_bq.convert import QuantConfig, dequantize_, quantize_
from triton_bq.export.format import pack_model
from triton_bq.export.hf import TritonBQConfig
from triton_bq.export.io import load_packed, save_packed
from triton_bq.export.size import model_size_report
from triton_bq.nn import (
    ActQuantizer,
    BinaryLinear,
    PackedEmbedding,
    PackedLinear,
    PackedSplitLinear,
    QuantEmbedding,
    QuantLinear,
    SplitBinaryEmbedding,
    SplitBinaryLinear,
    TernaryLinear,
    attach_optimizer,
    load_second_moments,
    second_moments,
)
from triton_bq.ops import packed_linear, quant_embedding, quant_linear
from triton_bq.options import QuantOptions
from triton_bq.recipe.adaptive import choose_splits, measure_split_sensitivity, split_candidates, split_costs
from triton_bq.recipe.distill import DistillationLoss, capture_attention_scores, distill_loss, record_attention_scores
from triton_bq.recipe.tws import split_ternary_to_binary
from triton_bq.recipe.width import shrink_width_

__version__ = "0.1.0"

__all__ = [
    "ActQuantizer",
    "BinaryLinear",
    "DistillationLoss",
    "PackedEmbedding",
    "PackedLinear",
    "PackedSplitLinear",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantOptions",
    "SplitBinaryEmbedding",
    "SplitBinaryLinear",
    "TernaryLinear",
    "TritonBQConfig",
    "attach_optimizer",
    "load_second_moments",
    "second_moments",
    "capture_attention_scores",
    "choose_splits",
    "dequantize_",
    "distill_loss",
    "load_packed",
    "measure_split_sensitivity",
    "model_size_report",
    "pack_model",
    "packed_linear",
    "quant_embedding",
    "quant_linear",
    "quantize_",
    "record_attention_scores",
    "reference",
    "save_packed",
    "shrink_width_",
    "split_candidates",
    "split_costs",
    "split_ternary_to_binary",
]
