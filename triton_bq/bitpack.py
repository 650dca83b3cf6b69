"""Packed 1-bit / 2-bit weight storage: the on-disk and in-memory format of exported binary / ternary layers.

Format (``PackedWeight``), for a Linear weight of shape ``[N, K]`` (out_features, in_features):

- ``data``: int32 ``[P, N, KW]`` with ``KW = ceil(K * bits / 32)``. Packing runs along K (the input dim):
  weight ``k`` of row ``n`` lives in word ``k // (32 // bits)`` at bit offset ``(k % (32 // bits)) * bits``
  (least significant bits first). ``P`` is the number of parts: 1 for a plain layer, 2 for a split-binary
  layer (two binary matrices whose outputs add up).
- ``bits = 1`` (binary): bit 1 means +1 and bit 0 means -1. Packing a real tensor stores its BWN sign
  with sign(0) = +1 (``w >= 0``), so BWN codes, latent weights and ``torch.sign``-style codes all pack the same.
- ``bits = 2`` (ternary): field 0 means 0, field 1 means +1, field 2 means -1 (low bit: "+1", high bit: "-1",
  decoded as ``(f & 1) - (f >> 1)``). Field 3 is never written and decodes as 0.
- K padding: the last word of a row is padded with zero bits up to a multiple of ``32 // bits`` weights.
  Padding decodes as -1 (binary) or 0 (ternary) and is never read as a weight: kernels mask ``k >= K`` on the
  activation side, and unpacking drops it.
- ``scale``: float32 ``[P, N]`` (one scale per output row, ``granularity="row"``) or ``[P, 1]`` (one per matrix,
  ``granularity="tensor"``). The dequantized weight is ``sum_p scale[p] * codes[p]``.
- An embedding table ``[V, D]`` packs the same way with ``N = V`` rows, ``K = D`` and row-wise scales.

True size: ``P * N * KW * 4`` bytes of codes (exactly 1 or 2 bits per weight when K is a multiple of
``32 // bits``) plus 4 bytes per scale.
"""

from __future__ import annotations

import dataclasses

import torch

from triton_bq import reference
from triton_bq.options import check_choice

__all__ = [
    "BITS",
    "PackedWeight",
    "pack_binary",
    "pack_codes",
    "pack_split_binary",
    "pack_ternary",
    "pack_weight",
    "packed_bytes",
    "scale_count",
    "unpack_binary",
    "unpack_codes",
    "unpack_ternary",
    "weight_bits",
    "words_per_row",
]

BITS = (1, 2)
WORD_BITS = 32
_METHOD_BITS = {"bwn": 1, "twn": 2, "lat": 2}


def _check_bits(bits) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be 1 (binary) or 2 (ternary), got {bits!r}")


def words_per_row(in_features: int, bits: int) -> int:
    """Number of int32 words that hold ``in_features`` weights of ``bits`` bits: ``ceil(in_features * bits / 32)``."""
    _check_bits(bits)
    if not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    per_word = WORD_BITS // bits
    return (in_features + per_word - 1) // per_word


def _fields(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned field values (int64) of codes: binary ``w >= 0``; ternary +1 -> 1, -1 -> 2, 0 -> 0."""
    if bits == 1:
        return (codes >= 0).to(torch.int64)
    valid = (codes == 0) | (codes == 1) | (codes == -1)
    if not bool(valid.all()):
        bad = codes[~valid].flatten()[0].item()
        raise ValueError(f"ternary codes must be in {{-1, 0, +1}}, got the value {bad!r}")
    return (codes == 1).to(torch.int64) + 2 * (codes == -1).to(torch.int64)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dim into int32 words: ``[..., K]`` -> ``[..., ceil(K * bits / 32)]``.

    ``bits=1``: any real tensor; bit 1 where ``codes >= 0`` (+1, sign(0) = +1), bit 0 elsewhere (-1).
    ``bits=2``: codes must be exactly -1, 0 or +1 (any dtype); field 1 = +1, field 2 = -1, field 0 = 0.
    The last word of each row is padded with zero bits. The result is on ``codes``' device.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a tensor, got {type(codes).__name__}")
    if codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be a real tensor, got dtype {codes.dtype}")
    if codes.dim() < 1 or codes.shape[-1] < 1:
        raise ValueError(f"codes must have a non-empty last dim, got shape {tuple(codes.shape)}")
    in_features = codes.shape[-1]
    per_word = WORD_BITS // bits
    words = words_per_row(in_features, bits)
    fields = _fields(codes.detach(), bits)
    fields = torch.nn.functional.pad(fields, (0, words * per_word - in_features))
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    packed = (fields.reshape(*codes.shape[:-1], words, per_word) << shifts).sum(dim=-1)
    # Reinterpret the unsigned 32-bit value as two's-complement int32.
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


def unpack_codes(
    data: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of ``pack_codes``: int32 ``[..., KW]`` -> codes ``[..., in_features]`` in ``dtype``.

    Binary codes are ``+1`` (bit 1) / ``-1`` (bit 0); ternary codes are ``(f & 1) - (f >> 1)`` of each 2-bit field.
    """
    _check_bits(bits)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.int32:
        raise TypeError(f"data must be an int32 tensor, got {getattr(data, 'dtype', type(data).__name__)}")
    words = words_per_row(in_features, bits)
    if data.dim() < 1 or data.shape[-1] != words:
        raise ValueError(
            f"data's last dim must be ceil(in_features * bits / 32) = {words} for in_features={in_features}, "
            f"bits={bits}; got shape {tuple(data.shape)}"
        )
    per_word = WORD_BITS // bits
    shifts = torch.arange(per_word, device=data.device, dtype=torch.int64) * bits
    fields = ((data.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    fields = fields.reshape(*data.shape[:-1], words * per_word)[..., :in_features]
    codes = 2 * fields - 1 if bits == 1 else (fields & 1) - (fields >> 1)
    return codes.to(dtype)


def pack_binary(weight: torch.Tensor) -> torch.Tensor:
    """Pack the BWN codes of ``weight`` (``+1`` where ``weight >= 0``, else ``-1``) 32 per int32 along the last dim."""
    return pack_codes(weight, 1)


def unpack_binary(data: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Binary codes (+1 / -1) from ``pack_binary`` words, last dim ``in_features``."""
    return unpack_codes(data, 1, in_features, dtype)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes in {-1, 0, +1} 16 per int32 along the last dim (0 -> 0, +1 -> 1, -1 -> 2)."""
    return pack_codes(codes, 2)


def unpack_ternary(data: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ternary codes (-1 / 0 / +1) from ``pack_ternary`` words, last dim ``in_features``."""
    return unpack_codes(data, 2, in_features, dtype)


@dataclasses.dataclass
class PackedWeight:
    """A packed binary / ternary Linear weight: ``W = sum_p scale[p] * codes[p]`` (see the module docstring).

    Attributes:
        data: int32 ``[P, N, KW]`` packed codes (``P`` = 1, or 2 for a split-binary layer).
        scale: float ``[P, N]`` (per row) or ``[P, 1]`` (per tensor); float32 as produced by the packers.
        bits: 1 (binary) or 2 (ternary).
        in_features: K, the unpadded input width.
    """

    data: torch.Tensor
    scale: torch.Tensor
    bits: int
    in_features: int

    def __post_init__(self):
        _check_bits(self.bits)
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.int32:
            raise TypeError(f"data must be an int32 tensor, got {getattr(self.data, 'dtype', type(self.data))}")
        if not isinstance(self.scale, torch.Tensor) or not self.scale.is_floating_point():
            raise TypeError(f"scale must be a floating-point tensor, got {getattr(self.scale, 'dtype', self.scale)}")
        words = words_per_row(self.in_features, self.bits)
        if self.data.dim() != 3 or self.data.shape[2] != words or self.data.shape[0] not in (1, 2):
            raise ValueError(
                f"data must have shape [parts (1 or 2), out_features, {words}] for in_features={self.in_features} "
                f"and bits={self.bits}, got {tuple(self.data.shape)}"
            )
        parts, out_features = self.data.shape[0], self.data.shape[1]
        if self.scale.dim() != 2 or self.scale.shape[0] != parts or self.scale.shape[1] not in (1, out_features):
            raise ValueError(
                f"scale must have shape [{parts}, 1] or [{parts}, {out_features}], got {tuple(self.scale.shape)}"
            )
        if self.scale.device != self.data.device:
            raise ValueError(f"scale is on {self.scale.device} but data is on {self.data.device}")

    @property
    def parts(self) -> int:
        """1 for a plain layer, 2 for a split-binary layer."""
        return self.data.shape[0]

    @property
    def out_features(self) -> int:
        return self.data.shape[1]

    @property
    def granularity(self) -> str:
        """``"tensor"`` when one scale covers each matrix, ``"row"`` for one scale per output row."""
        return "tensor" if self.scale.shape[1] == 1 else "row"

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes and scales as stored."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def codes(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unpacked codes ``[P, N, K]``."""
        return unpack_codes(self.data, self.bits, self.in_features, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The quantized weight ``sum_p scale[p] * codes[p]`` as ``[N, K]``, computed in float32, cast to ``dtype``."""
        weight = (self.scale.float().unsqueeze(-1) * self.codes(torch.float32)).sum(dim=0)
        return weight.to(dtype)

    def to(self, device) -> PackedWeight:
        """A copy on ``device`` (same tensors when already there)."""
        return PackedWeight(self.data.to(device), self.scale.to(device), self.bits, self.in_features)


def _as_scale_row(scale: torch.Tensor, out_features: int, name: str) -> torch.Tensor:
    """A reference scale (``[]`` for tensor, ``[N, 1]`` for row granularity) as a ``[1]`` or ``[N]`` float32 row."""
    scale = torch.as_tensor(scale).detach().float()
    if scale.numel() == 1:
        return scale.reshape(1)
    if scale.numel() != out_features:
        raise ValueError(f"{name} must have 1 or {out_features} elements, got shape {tuple(scale.shape)}")
    return scale.reshape(out_features)


def _check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        found = getattr(weight, "dtype", type(weight).__name__)
        raise TypeError(f"{name} must be a floating-point tensor, got {found}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")


def pack_weight(
    weight: torch.Tensor,
    method: str = "bwn",
    granularity: str = "tensor",
    second_moment: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> PackedWeight:
    """Quantize a latent ``[N, K]`` weight with the reference quantizer and pack it.

    ``method``: ``"bwn"`` (1 bit), ``"twn"`` or ``"lat"`` (2 bits); codes and scales come from
    ``triton_bq.reference`` (same sign(0), same strict threshold), so ``pack_weight(w).dequantize()`` equals
    ``reference.quantize_weight(w, method, granularity)``. ``scale``/``threshold`` override the computed
    ``alpha``/``delta`` (as in ``reference.quantize_weight``; give both for twn/lat).
    """
    _check_weight(weight)
    check_choice("method", method, reference.WEIGHT_METHODS)
    check_choice("granularity", granularity, reference.GRANULARITIES)
    if scale is None:
        scale, threshold = reference.weight_scale_threshold(weight, method, granularity, second_moment)
    elif method != "bwn" and threshold is None:
        raise ValueError(f"method={method!r} needs threshold together with scale")
    codes = reference.weight_codes(weight, None if method == "bwn" else threshold)
    bits = _METHOD_BITS[method]
    row = _as_scale_row(scale, weight.shape[0], "scale")
    return PackedWeight(pack_codes(codes, bits).unsqueeze(0), row.unsqueeze(0).to(weight.device), bits, weight.shape[1])


def pack_split_binary(
    weight1: torch.Tensor, weight2: torch.Tensor, granularity: str = "tensor"
) -> PackedWeight:
    """Pack a split-binary layer: two latent ``[N, K]`` weights whose BWN outputs add up (``P = 2``).

    ``dequantize()`` gives ``BWN(weight1) + BWN(weight2)``, which is the ternary weight right after ternary
    weight splitting.
    """
    _check_weight(weight1, "weight1")
    _check_weight(weight2, "weight2")
    if weight1.shape != weight2.shape:
        raise ValueError(f"weight1 and weight2 must have the same shape, got {tuple(weight1.shape)} and "
                         f"{tuple(weight2.shape)}")
    halves = [pack_weight(weight, "bwn", granularity) for weight in (weight1, weight2)]
    return PackedWeight(
        torch.cat([half.data for half in halves]), torch.cat([half.scale for half in halves]), 1, weight1.shape[1]
    )


def packed_bytes(rows: int, columns: int, bits: int) -> int:
    """``rows * ceil(columns * bits / 32) * 4``: a ``[rows, columns]`` matrix at ``bits`` bits per value, each row
    packed into whole int32 words (this format)."""
    if rows < 0 or columns < 0 or bits < 1:
        raise ValueError(f"rows, columns must be >= 0 and bits >= 1, got rows={rows}, columns={columns}, bits={bits}")
    return rows * -(-columns * bits // 32) * 4


def weight_bits(weight_method: str | None) -> int:
    """Stored bits per weight: 1 for ``bwn``, 2 for ``twn``/``lat``, 32 for ``None`` (full precision)."""
    table = {"bwn": 1, "twn": 2, "lat": 2, None: 32}
    if weight_method not in table:
        raise ValueError(f"weight_method must be one of {tuple(table)}, got {weight_method!r}")
    return table[weight_method]


def scale_count(rows: int, granularity: str) -> int:
    """Stored float32 scales of a ``[rows, columns]`` matrix: one per row (``"row"``, embeddings) or one in all."""
    check_choice("granularity", granularity, reference.GRANULARITIES)
    return rows if granularity == "row" else 1
