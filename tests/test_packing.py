"""Packed 1-bit / 2-bit format: exact round trips, the pinned bit layout, K padding, agreement with the reference."""

import pytest
import torch

from triton_bq import bitpack as packing
from triton_bq import reference

SHAPES = [(1, 1), (5, 31), (7, 32), (3, 33), (33, 100), (4, 96), (2, 3, 65)]
SHAPE_IDS = ["1x1", "5x31", "7x32", "3x33", "33x100", "4x96", "2x3x65"]


def _ternary_codes(shape, generator):
    return torch.randint(-1, 2, shape, generator=generator).float()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_binary_round_trip_is_the_bwn_sign(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    weight.view(-1)[::7] = 0.0
    weight.view(-1)[3::11] = -0.0
    data = packing.pack_binary(weight)
    assert data.dtype == torch.int32
    assert data.shape == (*shape[:-1], -(-shape[-1] // 32))
    codes = packing.unpack_binary(data, shape[-1])
    assert torch.equal(codes, reference.bwn_codes(weight))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ternary_round_trip_is_exact(shape):
    codes = _ternary_codes(shape, torch.Generator().manual_seed(1))
    data = packing.pack_ternary(codes)
    assert data.shape == (*shape[:-1], -(-shape[-1] // 16))
    assert torch.equal(packing.unpack_ternary(data, shape[-1]), codes)
    assert torch.equal(packing.unpack_codes(data, 2, shape[-1], torch.int8), codes.to(torch.int8))


def test_bit_layout_is_pinned():
    # Binary: weight k sets bit k of its word when its code is +1 (sign(0) = +1).
    assert packing.pack_binary(torch.tensor([[1.0, -1.0, 0.0]])).tolist() == [[0b101]]
    assert packing.pack_binary(torch.ones(1, 32)).tolist() == [[-1]]
    assert packing.pack_binary(-torch.ones(1, 32)).tolist() == [[0]]
    top = torch.full((1, 32), -1.0)
    top[0, 31] = 1.0
    assert packing.pack_binary(top).tolist() == [[-(2**31)]]
    # Ternary: field k (bits 2k, 2k+1) holds 1 for +1, 2 for -1, 0 for 0.
    assert packing.pack_ternary(torch.tensor([[1, -1, 0, 1]])).tolist() == [[1 + (2 << 2) + (1 << 6)]]
    assert packing.pack_ternary(-torch.ones(1, 16)).tolist() == [[0xAAAAAAAA - 2**32]]


def test_padding_bits_are_zero_and_ignored():
    weight = torch.ones(2, 33)
    data = packing.pack_binary(weight)
    assert data[:, 1].tolist() == [1, 1]
    ternary = packing.pack_ternary(-torch.ones(1, 17))
    assert ternary[0, 1].item() == 2
    assert packing.unpack_ternary(ternary, 17).shape == (1, 17)


def test_ternary_field_three_decodes_as_zero():
    data = torch.tensor([[3 | (1 << 2) | (2 << 4)]], dtype=torch.int32)
    assert packing.unpack_ternary(data, 3).tolist() == [[0.0, 1.0, -1.0]]


def test_words_per_row():
    assert [packing.words_per_row(k, 1) for k in (1, 31, 32, 33, 100)] == [1, 1, 1, 2, 4]
    assert [packing.words_per_row(k, 2) for k in (1, 16, 17, 96, 100)] == [1, 1, 2, 6, 7]


def test_packing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ternary codes"):
        packing.pack_ternary(torch.tensor([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="ternary codes"):
        packing.pack_ternary(torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="bits must be 1"):
        packing.pack_codes(torch.ones(2, 3), 3)
    with pytest.raises(TypeError, match="int32"):
        packing.unpack_binary(torch.zeros(2, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="last dim"):
        packing.unpack_binary(torch.zeros(2, 2, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="non-empty"):
        packing.pack_binary(torch.ones(2, 0))
    with pytest.raises(TypeError, match="real tensor"):
        packing.pack_binary(torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("method", ["bwn", "twn", "lat"])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_pack_weight_dequantizes_to_the_reference(method, granularity):
    weight = torch.randn(9, 70, generator=torch.Generator().manual_seed(2))
    scale, threshold = reference.weight_scale_threshold(weight, method, granularity)
    packed = packing.pack_weight(weight, method, granularity)
    assert packed.bits == (1 if method == "bwn" else 2)
    assert packed.parts == 1 and packed.granularity == granularity
    assert packed.scale.shape == ((1, 1) if granularity == "tensor" else (1, 9))
    assert torch.equal(packed.codes()[0], reference.weight_codes(weight, threshold))
    torch.testing.assert_close(packed.scale[0], scale.reshape(-1), rtol=0, atol=0)
    expected = reference.quantize_weight(weight, method, granularity, scale=scale, threshold=threshold)
    assert torch.equal(packed.dequantize(), expected)


def test_pack_weight_with_given_scale_and_threshold():
    weight = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    packed = packing.pack_weight(weight, "twn", scale=torch.tensor(0.5), threshold=torch.tensor(0.25))
    assert torch.equal(packed.codes()[0], reference.twn_codes(weight, torch.tensor(0.25)))
    assert packed.scale.tolist() == [[0.5]]
    with pytest.raises(ValueError, match="threshold"):
        packing.pack_weight(weight, "twn", scale=torch.tensor(0.5))


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_split_binary_is_the_sum_of_two_bwn_weights(granularity):
    generator = torch.Generator().manual_seed(4)
    first, second = torch.randn(6, 45, generator=generator), torch.randn(6, 45, generator=generator)
    packed = packing.pack_split_binary(first, second, granularity)
    assert packed.parts == 2 and packed.bits == 1 and packed.data.shape == (2, 6, 2)
    expected = reference.quantize_weight(first, "bwn", granularity) + reference.quantize_weight(
        second, "bwn", granularity
    )
    assert torch.equal(packed.dequantize(), expected)
    with pytest.raises(ValueError, match="same shape"):
        packing.pack_split_binary(first, second[:, :44])


def test_packed_weight_validates_and_reports_its_size():
    data = torch.zeros(1, 5, 4, dtype=torch.int32)
    packed = packing.PackedWeight(data, torch.ones(1, 5), 1, 100)
    assert (packed.out_features, packed.in_features, packed.parts, packed.granularity) == (5, 100, 1, "row")
    assert packed.nbytes == 5 * 4 * 4 + 5 * 4
    with pytest.raises(ValueError, match="data must have shape"):
        packing.PackedWeight(data, torch.ones(1, 5), 1, 200)
    with pytest.raises(ValueError, match="scale must have shape"):
        packing.PackedWeight(data, torch.ones(1, 4), 1, 100)
    with pytest.raises(TypeError, match="int32"):
        packing.PackedWeight(data.long(), torch.ones(1, 5), 1, 100)
    with pytest.raises(TypeError, match="floating-point"):
        packing.PackedWeight(data, torch.ones(1, 5, dtype=torch.int32), 1, 100)
