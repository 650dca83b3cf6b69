"""The options of one quantized linear op: what is quantized and how, in one frozen, validated value.

``QuantOptions`` is made once (by ``QuantConfig`` for each layer, or by hand) and carried unchanged through the
layer (``QuantLinear``), the functional op (``triton_bq.ops.quant_linear``), the pure-PyTorch reference
(``triton_bq.reference.quant_linear``) and the fused kernel launcher. Tensors (learned clips and steps, precomputed
LAT scales) travel beside it, never inside it, so the value is hashable and safe to use as a cache key.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "ACT_GRANULARITIES",
    "ACT_METHODS",
    "GRANULARITIES",
    "LSQ_METHODS",
    "STES",
    "WEIGHT_METHODS",
    "QuantOptions",
    "check_act_bits",
    "check_choice",
]

WEIGHT_METHODS = ("bwn", "twn", "lat")
ACT_METHODS = ("sym", "asym", "lsq", "asym_lsq")
# The activation methods with a learned step (``act_step``) instead of a learnable clip (``act_clip``).
LSQ_METHODS = ("lsq", "asym_lsq")
GRANULARITIES = ("tensor", "row")
STES = ("identity", "clipped")
ACT_GRANULARITIES = ("per_tensor", "per_token")


def check_choice(name: str, value, choices, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``value`` is one of ``choices`` (or ``None``)."""
    if value is None and allow_none:
        return
    if value not in choices:
        suffix = " or None" if allow_none else ""
        raise ValueError(f"{name} must be one of {choices}{suffix}, got {value!r}")


def check_act_bits(bits, name: str = "act_bits") -> None:
    """Raise ``ValueError`` unless ``bits`` is an int in 2..8 (bools are not bits)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an int in 2..8, got {bits!r}")


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """How one linear op quantizes its weight and (optionally) its input.

    Attributes:
        weight_method: ``"bwn"`` (binary), ``"twn"`` (ternary), ``"lat"`` (loss-aware ternary; the op then needs
            precomputed ``weight_scale`` / ``weight_threshold``) or ``None`` (weight kept in full precision).
        granularity: one weight scale per ``"tensor"`` (the papers') or per output ``"row"``.
        ste: straight-through estimator of the weight: ``"identity"`` (the papers' code) or ``"clipped"``
            (gradient only where ``|w| <= 1``).
        act_method: ``None`` (input not quantized), ``"sym"`` / ``"asym"`` (uniform after a learnable clip, PACT
            gradient) or ``"lsq"`` (learned step size).
        act_bits: input bits, 2..8 (read only when ``act_method`` is set).
        act_signed: LSQ only: ``False`` for non-negative inputs (codes ``0..2^bits - 1``).
        act_granularity: the dynamic scale of ``"sym"`` / ``"asym"``: one per ``"per_tensor"`` (the papers') or
            one per ``"per_token"`` (per row of ``x``: no token's codes depend on another token, as a causal LM
            needs). The LSQ step is learned, not measured, so LSQ reads the same step either way.
        act_sync: the op runs data-parallel: under an initialized ``torch.distributed`` the per-tensor min / max
            are all-reduced over the default process group before quantizing (every rank then uses the scale of
            the global batch) and the LSQ step gradient takes ``numel * world_size`` as its element count.
    """

    weight_method: str | None = "bwn"
    granularity: str = "tensor"
    ste: str = "identity"
    act_method: str | None = None
    act_bits: int = 8
    act_signed: bool = True
    act_granularity: str = "per_tensor"
    act_sync: bool = False

    def __post_init__(self):
        check_choice("weight_method", self.weight_method, WEIGHT_METHODS, allow_none=True)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("ste", self.ste, STES)
        check_choice("act_method", self.act_method, ACT_METHODS, allow_none=True)
        check_act_bits(self.act_bits)
        if not isinstance(self.act_signed, bool):
            raise TypeError(f"act_signed must be a bool, got {type(self.act_signed).__name__}")
        check_choice("act_granularity", self.act_granularity, ACT_GRANULARITIES)
        if not isinstance(self.act_sync, bool):
            raise TypeError(f"act_sync must be a bool, got {type(self.act_sync).__name__}")

    @property
    def is_identity(self) -> bool:
        """Neither the weight nor the input is quantized: the op is a plain ``F.linear``."""
        return self.weight_method is None and self.act_method is None

    def replace(self, **changes) -> QuantOptions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
