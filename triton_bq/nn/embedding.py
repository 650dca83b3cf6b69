"""Drop-in quantized word embedding: ``QuantEmbedding``, row-wise binary or ternary.

The latent table stays the ``weight`` Parameter (same state dict keys as ``nn.Embedding``), and
``from_embedding``/``to_embedding`` share it instead of copying.
"""

from __future__ import annotations

import torch
from torch import nn

from triton_bq import ops
from triton_bq.nn.activation import second_moment_of
from triton_bq.options import STES, WEIGHT_METHODS, check_choice

__all__ = ["QuantEmbedding"]


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with row-wise binary (``"bwn"``) or ternary (``"twn"``/``"lat"``) weights.

    Only the looked-up rows are quantized (each row has its own scale), and the latent table stays the
    ``weight`` Parameter. ``max_norm`` and sparse gradients are not supported.
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
        weight_method: str | None = "bwn",
        ste: str = "identity",
    ):
        check_choice("weight_method", weight_method, WEIGHT_METHODS, allow_none=True)
        check_choice("ste", ste, STES)
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self.weight_method, self.ste = weight_method, ste

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, **options) -> QuantEmbedding:
        """Wrap an ``nn.Embedding``, sharing its ``weight`` Parameter (no copy)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("QuantEmbedding does not support max_norm or sparse embeddings")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta", **options)
        module.weight = embedding.weight
        module.train(embedding.training)
        return module

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` sharing this layer's latent ``weight``."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        embedding.weight = self.weight
        embedding.train(self.training)
        return embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        moment = second_moment_of(self) if self.weight_method == "lat" else None
        return ops.quant_embedding(
            input_ids, self.weight, weight_method=self.weight_method, ste=self.ste, second_moment=moment,
            padding_idx=self.padding_idx,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_method={self.weight_method!r}, ste={self.ste!r}"
