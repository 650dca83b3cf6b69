"""Quantized layers: training layers on latent full-precision weights, split-binary layers and packed inference
layers, with the activation quantizer and quantized self-attention they use."""

from triton_bq.nn.activation import ActQuantizer, attach_optimizer, load_second_moments, second_moments
from triton_bq.nn.attention import QuantSelfAttentionMixin, dequantize_attention, quantize_attention
from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import BinaryLinear, QuantLinear, TernaryLinear
from triton_bq.nn.packed import PackedEmbedding, PackedLinear, PackedSplitLinear
from triton_bq.nn.split import SplitBinaryEmbedding, SplitBinaryLinear

__all__ = [
    "ActQuantizer",
    "BinaryLinear",
    "PackedEmbedding",
    "PackedLinear",
    "PackedSplitLinear",
    "QuantEmbedding",
    "QuantLinear",
    "QuantSelfAttentionMixin",
    "SplitBinaryEmbedding",
    "SplitBinaryLinear",
    "TernaryLinear",
    "attach_optimizer",
    "load_second_moments",
    "second_moments",
    "dequantize_attention",
    "quantize_attention",
]
