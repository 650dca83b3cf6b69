"""The public API is pinned: additions are deliberate, and every public name is documented."""

import inspect

import triton_bq

PUBLIC = {
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
}


def test_public_names_are_pinned():
    assert set(triton_bq.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(triton_bq, name), name


def test_public_names_have_docstrings():
    for name in triton_bq.__all__:
        obj = getattr(triton_bq, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"
