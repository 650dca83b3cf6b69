"""Drop-in quantized word embedding: ``QuantEmbedding``, row-wise binary or ternary.

The latent table stays the ``weight`` Parameter (same state dict keys as ``nn.Embedding``), and
``from_embedding``/``to_embedding`` share it instead of copying. ``quantize_embedding`` also handles ``nn.Embedding``
subclasses (BART's ``BartScaledWordEmbedding`` multiplies by ``embed_scale``): their class is swapped in place to one
whose lookup is ``QuantEmbedding``'s and whose own ``forward`` (the scale) still runs; ``dequantize_embedding`` undoes
either form.
"""

from __future__ import annotations

import torch
from torch import nn

from triton_bq import ops
from triton_bq.nn.activation import second_moment_of
from triton_bq.nn.linear import check_finite_weight
from triton_bq.nn.swap import original_class, swap_class, unswap_class
from triton_bq.options import STES, WEIGHT_METHODS, check_choice

__all__ = ["QuantEmbedding", "check_plain_lookup", "dequantize_embedding", "quantize_embedding"]


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with row-wise binary (``"bwn"``) or ternary (``"twn"``/``"lat"``) weights.

    Only the looked-up rows are quantized (each row has its own scale), and the latent table stays the
    ``weight`` Parameter. ``max_norm`` and sparse gradients are not supported. A looked-up row holding a NaN or inf
    raises a ValueError naming the layer (``layer_name``), at the cost of one host synchronization per forward on CUDA
    (``check_finite = False`` turns it off; see ``triton_bq.nn.linear``).
    """

    granularity = "row"
    layer_name: str | None = None
    check_finite: bool = True

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
        if self.weight_method is not None and self.check_finite:
            check_finite_weight(self, torch.nn.functional.embedding(input_ids, self.weight))
        moment = second_moment_of(self) if self.weight_method == "lat" else None
        return ops.quant_embedding(
            input_ids, self.weight, weight_method=self.weight_method, ste=self.ste, second_moment=moment,
            padding_idx=self.padding_idx,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_method={self.weight_method!r}, ste={self.ste!r}"


def _check_embedding(embedding: nn.Module) -> None:
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
    if embedding.max_norm is not None or embedding.sparse:
        raise ValueError("QuantEmbedding does not support max_norm or sparse embeddings")


def quantize_embedding(
    embedding: nn.Embedding, weight_method: str | None = "bwn", ste: str = "identity"
) -> nn.Embedding:
    """The quantized form of ``embedding`` (sharing its ``weight`` Parameter).

    A plain ``nn.Embedding`` gives a new ``QuantEmbedding``. An ``nn.Embedding`` subclass keeps its object and its own
    ``forward`` (e.g. a scale): its class is swapped in place to a subclass of both its class and ``QuantEmbedding``,
    whose lookup (``super().forward``) is the quantized one.
    """
    _check_embedding(embedding)
    check_choice("weight_method", weight_method, WEIGHT_METHODS, allow_none=True)
    check_choice("ste", ste, STES)
    if type(embedding) is nn.Embedding:
        return QuantEmbedding.from_embedding(embedding, weight_method=weight_method, ste=ste)
    if isinstance(embedding, QuantEmbedding):
        raise TypeError(f"embedding is already quantized ({type(embedding).__name__})")
    swap_class(embedding, (type(embedding), QuantEmbedding))
    embedding.weight_method, embedding.ste = weight_method, ste
    return embedding


def dequantize_embedding(module: QuantEmbedding) -> nn.Embedding:
    """Undo ``quantize_embedding``: a plain ``nn.Embedding`` sharing the latent weight, or the swapped subclass
    instance with its original class back."""
    if not isinstance(module, QuantEmbedding):
        raise TypeError(f"module must be a QuantEmbedding, got {type(module).__name__}")
    if original_class(module) is None:
        return module.to_embedding()
    for name in ("weight_method", "ste", "layer_name"):
        module.__dict__.pop(name, None)
    return unswap_class(module)


def check_plain_lookup(module: nn.Module, action: str) -> None:
    """Raise a ValueError when ``module`` is a quantized ``nn.Embedding`` subclass with its own ``forward`` (BART's
    ``embed_scale``, ...): ``action`` (splitting, binarizing, packing) builds plain lookups, which would drop it."""
    original = original_class(module)
    if original is not None:
        name = getattr(module, "layer_name", None) or type(module).__name__
        raise ValueError(
            f"cannot {action} {name}: it is a quantized {original.__name__}, whose own forward (e.g. a scale) the "
            f"{action} result would not apply; quantize the model with QuantConfig(embedding_method=None) to keep "
            f"this embedding in full precision"
        )

