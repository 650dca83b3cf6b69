"""triton_bq: fused Triton kernels and the BinaryBERT / TernaryBERT recipe for 1-bit and 2-bit QAT.

Public API (everything else is private):

- Layers: ``QuantLinear``, ``BinaryLinear``, ``TernaryLinear``, ``QuantEmbedding``, ``ActQuantizer``.
- Module swap: ``QuantConfig``, ``quantize_``, ``dequantize_``.
- Functional ops: ``quant_linear``, ``quant_embedding``.
- Loss-aware ternarization: ``attach_optimizer``.
- The pure-PyTorch reference quantizers: ``triton_bq.reference``.
"""

from triton_bq import reference
from triton_bq.convert import QuantConfig, dequantize_, quantize_
from triton_bq.functional import quant_embedding, quant_linear
from triton_bq.modules import BinaryLinear, QuantEmbedding, QuantLinear, TernaryLinear
from triton_bq.quantizers import ActQuantizer, attach_optimizer

__version__ = "0.1.0"

__all__ = [
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
]
