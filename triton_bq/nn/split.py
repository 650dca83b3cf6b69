"""Split binary layers: the BinaryBERT layers produced by ternary weight splitting (``triton_bq.splitting``).

A split layer holds two binary halves and returns their sum:

``y = BWN-linear(x; W1, b1, Q1) + BWN-linear(x; W2, b2, Q2)``

(``Qi`` is each half's own activation quantizer), which is ``[Q1(x), Q2(x)] @ [BWN(W1), BWN(W2)]^T + b1 + b2``: a
binary layer of twice the input width. Each half is a ``triton_bq.BinaryLinear`` (or a binary
``triton_bq.QuantEmbedding``), so it runs the fused ``triton_bq.ops.quant_linear`` path, packs like any other
binary layer and is undone by ``triton_bq.dequantize_`` (the halves become plain ``nn.Linear``/``nn.Embedding`` and
the layer then computes ``x (W1 + W2)^T + b1 + b2`` in full precision).

The two halves are two launches of the fused kernel: one launch over the concatenated ``[N, 2K]`` weight would
need one BWN scale per K-half and one activation quantizer per K-half, and the kernel takes a single scale per
tensor (or per output row) and a single activation quantizer.
"""

from __future__ import annotations

import torch
from torch import nn

from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import BinaryLinear

__all__ = ["SplitBinaryLinear", "SplitBinaryEmbedding"]


class _SplitHalves(nn.Module):
    """Two binary halves ``half1``, ``half2`` applied to the same input and summed."""

    weight_method = "bwn"

    @classmethod
    def _assemble(cls, half1: nn.Module, half2: nn.Module, **attributes):
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for name, value in attributes.items():
            setattr(module, name, value)
        module.half1, module.half2 = half1, half2
        module.train(half1.training)
        return module

    @property
    def weight1(self) -> nn.Parameter:
        """Latent weight of the first half."""
        return self.half1.weight

    @property
    def weight2(self) -> nn.Parameter:
        """Latent weight of the second half."""
        return self.half2.weight

    def halves(self) -> tuple[nn.Module, nn.Module]:
        """The two binary halves ``(half1, half2)``."""
        return self.half1, self.half2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.half1(x) + self.half2(x)


class SplitBinaryLinear(_SplitHalves):
    """Two ``BinaryLinear`` halves on the same input, summed: ``y = half1(x) + half2(x)``.

    Built by ``triton_bq.splitting.split_ternary_to_binary`` from a ``TernaryLinear`` so that, at the split,
    ``BWN(W1) + BWN(W2) == TWN(W)`` and the layer's output equals the ternary layer's. It can also be built empty
    (random latent halves) to load a state dict saved from a split model.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear`` (each half has this shape).
        **options: ``BinaryLinear`` options shared by both halves (``granularity``, ``ste``, ``act_bits``,
            ``act_method``, ``act_signed``, ``clip_init``, ``backend``).

    Export hook (packing): ``weight1``/``weight2`` are the latent halves ``[out_features, in_features]``,
    ``weight_method`` is ``"bwn"``, ``granularity`` the scale granularity of both, ``bias1 + bias2`` the bias,
    ``half1.act_quantizer``/``half2.act_quantizer`` the two input quantizers.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, **options):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.half1 = BinaryLinear(in_features, out_features, bias, device, dtype, **options)
        self.half2 = BinaryLinear(in_features, out_features, bias, device, dtype, **options)

    @classmethod
    def from_halves(cls, half1: BinaryLinear, half2: BinaryLinear) -> SplitBinaryLinear:
        """Assemble two ``BinaryLinear`` of the same shape and options (they are used as is, not copied)."""
        for name, half in (("half1", half1), ("half2", half2)):
            if not isinstance(half, BinaryLinear):
                raise TypeError(f"{name} must be a BinaryLinear, got {type(half).__name__}")
        if half1.weight.shape != half2.weight.shape:
            raise ValueError(
                f"half1 and half2 must have the same shape, got {tuple(half1.weight.shape)} and "
                f"{tuple(half2.weight.shape)}"
            )
        if (half1.granularity, half1.ste) != (half2.granularity, half2.ste):
            raise ValueError(
                f"half1 and half2 must share granularity and ste, got {(half1.granularity, half1.ste)} and "
                f"{(half2.granularity, half2.ste)}"
            )
        return cls._assemble(half1, half2, in_features=half1.in_features, out_features=half1.out_features)

    @property
    def bias1(self) -> nn.Parameter | None:
        """Bias of the first half (``bias / 2`` right after the split)."""
        return self.half1.bias

    @property
    def bias2(self) -> nn.Parameter | None:
        """Bias of the second half (``bias / 2`` right after the split)."""
        return self.half2.bias

    @property
    def granularity(self) -> str:
        """Scale granularity of both halves (that of the ternary layer they were split from)."""
        return self.half1.granularity

    def merged_bias(self) -> torch.Tensor | None:
        """``bias1 + bias2`` (detached): the single bias an exported layer needs."""
        if self.half1.bias is None:
            return None
        return (self.half1.bias + self.half2.bias).detach()

    def quantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(BWN(W1), BWN(W2))`` as materialized copies (inspection and export)."""
        return self.half1.quantized_weight(), self.half2.quantized_weight()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, split=2 x bwn"


class SplitBinaryEmbedding(_SplitHalves):
    """Two row-wise binary ``QuantEmbedding`` tables, looked up with the same ids and summed.

    Built by ``triton_bq.splitting.split_ternary_to_binary`` from a ternary ``QuantEmbedding`` (rows split one by
    one), or empty to load a state dict. ``weight1``/``weight2`` are the latent tables.
    """

    granularity = "row"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        ste: str = "identity",
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        options = dict(device=device, dtype=dtype, weight_method="bwn", ste=ste)
        self.half1 = QuantEmbedding(num_embeddings, embedding_dim, padding_idx, **options)
        self.half2 = QuantEmbedding(num_embeddings, embedding_dim, padding_idx, **options)

    @classmethod
    def from_halves(cls, half1: QuantEmbedding, half2: QuantEmbedding) -> SplitBinaryEmbedding:
        """Assemble two binary ``QuantEmbedding`` of the same shape (used as is, not copied)."""
        for name, half in (("half1", half1), ("half2", half2)):
            if not isinstance(half, QuantEmbedding) or half.weight_method != "bwn":
                raise TypeError(f"{name} must be a QuantEmbedding with weight_method='bwn', got {half!r}")
        if half1.weight.shape != half2.weight.shape or half1.padding_idx != half2.padding_idx:
            raise ValueError(
                f"half1 and half2 must have the same shape and padding_idx, got {tuple(half1.weight.shape)}, "
                f"{half1.padding_idx} and {tuple(half2.weight.shape)}, {half2.padding_idx}"
            )
        return cls._assemble(half1, half2, num_embeddings=half1.num_embeddings, embedding_dim=half1.embedding_dim,
                             padding_idx=half1.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, split=2 x bwn"

