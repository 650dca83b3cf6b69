"""The public API is pinned: additions are deliberate, and every public name is documented."""

import inspect

import triton_bq

PUBLIC = {
    "ActQuantizer",
    "BinaryLinear",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "TernaryLinear",
    "attach_optimizer",
    "dequantize_",
    "quant_embedding",
    "quant_linear",
    "quantize_",
    "reference",
}


def test_public_names_are_pinned():
    assert set(triton_bq.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(triton_bq, name), name


def test_public_names_have_docstrings():
    for name in triton_bq.__all__:
        obj = getattr(triton_bq, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"
