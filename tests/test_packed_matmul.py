"""Packed-weight inference kernels (Triton; the CPU interpreter without a GPU) against dequantize-then-matmul.

Outputs are NaN-poisoned (split-K workspaces too) before each launch, so an element a program forgot to write fails.
Integer paths (int8 activations x +-1/0 codes) are checked bit-exactly with unit scales.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton_bq.kernels import configs
from triton_bq.kernels import packed_matmul as pm

from triton_bq import bitpack as packing
from triton_bq.ops import packed_linear, quantize_int8_reference

H100 = configs.TARGETS["sm_90"]

# Float tolerance per activation dtype, in one place: elementwise rtol for float32 (atol relative to the largest
# output), relative Frobenius error for the 16-bit types.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SQNR_FLOOR_DB = {torch.float32: 100.0, torch.bfloat16: 40.0, torch.float16: 50.0}


def assert_matches(out, expected):
    """``out`` (any float dtype) against a float64 ``expected`` within the tolerance of ``out.dtype``."""
    assert not torch.isnan(out).any(), "an output element was never written"
    tolerance, got = TOLERANCE[out.dtype], out.double()
    if out.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    else:
        error = (got - expected).norm() / expected.norm()
        assert error <= tolerance, f"relative error {error:.3g} > {tolerance} for {out.dtype}"
    sqnr = 10 * math.log10(expected.pow(2).sum() / (got - expected).pow(2).sum().clamp_min(1e-300))
    assert sqnr >= SQNR_FLOOR_DB[out.dtype], f"SQNR {sqnr:.1f} dB below {SQNR_FLOOR_DB[out.dtype]} dB"


def make_packed(out_features, in_features, bits, parts=1, granularity="tensor", seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(parts)]
    if parts == 2:
        return packing.pack_split_binary(*weights, granularity).to(device)
    return packing.pack_weight(weights[0], "bwn" if bits == 1 else "twn", granularity).to(device)


def random_inputs(M, N, K, seed, device, dtype=torch.float32):
    """``x [M, K]`` and ``bias [N]`` drawn on the CPU (same values on every device)."""
    generator = torch.Generator().manual_seed(seed)
    x, bias = torch.randn(M, K, generator=generator), torch.randn(N, generator=generator)
    return x.to(device, dtype), bias.to(device, dtype)


def expected_output(x, packed, bias=None, x_scale=None):
    y = x.double() @ packed.dequantize(torch.float64).T
    if x_scale is not None:
        y = y * x_scale.double().reshape(-1, 1)
    return y if bias is None else y + bias.double()


def random_words(shape, generator):
    """int32 words of uniformly random bits: every field value (ternary 3 too) in every lane."""
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, dtype=torch.int32)


def exact_int8_output(q, unit):
    """``q @ W^T`` of int8 ``q`` and unit-scale codes: integers below 2^53, exact in float64 products and sums."""
    return sum(q.double() @ unit.codes(torch.float64)[part].T for part in range(unit.parts))


def run(x, packed, bias=None, *, x_scale=None, out_dtype=None, kernel="auto", config=None):
    """The launcher with a NaN-poisoned output."""
    out_dtype = out_dtype or (torch.float32 if x.dtype == torch.int8 else x.dtype)
    out = torch.full((x.shape[0], packed.out_features), float("nan"), dtype=out_dtype, device=x.device)
    result = pm.packed_matmul(
        x, packed.data, packed.scale, bias, bits=packed.bits, in_features=packed.in_features, x_scale=x_scale,
        out=out, kernel=kernel, config=config,
    )
    assert result is out
    return out


@pytest.fixture(autouse=True)
def poisoned_workspace(monkeypatch):
    """Split-K partial sums start as NaN (float) or a large integer (int32)."""

    def poisoned(shape, device, dtype):
        fill = float("nan") if dtype.is_floating_point else 2**30
        return torch.full(shape, fill, device=device, dtype=dtype)

    monkeypatch.setattr(pm, "_new_workspace", poisoned)


SHAPE_CASES = [
    pytest.param(1, 33, 96, "gemv", id="M1-N33-K96-gemv"),
    pytest.param(1, 33, 100, "gemm", id="M1-N33-K100-gemm"),
    pytest.param(7, 33, 100, "gemv", id="M7-N33-K100-gemv"),
    pytest.param(7, 33, 96, "gemm", id="M7-N33-K96-gemm"),
    pytest.param(16, 33, 100, "gemv", id="M16-N33-K100-gemv"),
    pytest.param(16, 33, 96, "gemm", id="M16-N33-K96-gemm"),
    pytest.param(33, 33, 100, "gemm", id="M33-N33-K100-gemm"),
    pytest.param(2, 64, 128, "auto", id="M2-N64-K128-auto"),
]


@pytest.mark.parametrize("bits", [1, 2], ids=["W1", "W2"])
@pytest.mark.parametrize("M, N, K, kernel", SHAPE_CASES)
def test_float32_matches_dequantize_then_matmul(M, N, K, kernel, bits, device):
    packed = make_packed(N, K, bits, granularity="row" if M % 2 else "tensor", device=device)
    x, bias = random_inputs(M, N, K, M, device)
    assert_matches(run(x, packed, bias, kernel=kernel), expected_output(x, packed, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [1, 2], ids=["W1", "W2"])
@pytest.mark.parametrize("M, kernel", [(1, "gemv"), (7, "gemm"), (16, "gemv")], ids=["M1-gemv", "M7-gemm", "M16-gemv"])
def test_half_precision_matches(M, kernel, bits, dtype, device):
    packed = make_packed(33, 100, bits, granularity="row", device=device)
    x, bias = random_inputs(M, 33, 100, 5, device, dtype)
    out = run(x, packed, bias, kernel=kernel)
    assert out.dtype == dtype
    assert_matches(out, expected_output(x, packed, bias))


SPLIT_CONFIGS = [
    pytest.param(dict(kernel="gemv", BLOCK_M=1, BLOCK_N=16, BLOCK_KW=1, SPLIT_K=3), 1, id="gemv-M1"),
    pytest.param(dict(kernel="gemv", BLOCK_M=8, BLOCK_N=16, BLOCK_KW=1, SPLIT_K=2), 7, id="gemv-M7"),
    pytest.param(dict(kernel="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, SPLIT_K=3), 33, id="gemm-M33"),
]


@pytest.mark.parametrize("bits", [1, 2], ids=["W1", "W2"])
@pytest.mark.parametrize("config, M", SPLIT_CONFIGS)
def test_split_k_matches(config, M, bits, device):
    config = dict(config, num_warps=4, num_stages=1)
    packed = make_packed(33, 100, bits, granularity="row", device=device)
    x, bias = random_inputs(M, 33, 100, 6, device)
    assert_matches(run(x, packed, bias, config=config), expected_output(x, packed, bias))


@pytest.mark.parametrize("M, config", [
    pytest.param(1, dict(kernel="gemv", BLOCK_M=1, BLOCK_N=16, BLOCK_KW=2, SPLIT_K=2), id="M1-gemv"),
    pytest.param(2, dict(kernel="gemv", BLOCK_M=2, BLOCK_N=32, BLOCK_KW=4, SPLIT_K=1), id="M2-gemv"),
])
@pytest.mark.parametrize("bits", [1, 2], ids=["W1", "W2"])
def test_mask_free_gemv_on_even_shapes(M, config, bits, device):
    # N a multiple of BLOCK_N, K of 32 * BLOCK_KW words and M == BLOCK_M: the loads run without masks.
    config = dict(config, num_warps=4, num_stages=1)
    packed = make_packed(32, 128, bits, device=device)
    x, _ = random_inputs(M, 32, 128, 7, device)
    assert_matches(run(x, packed, config=config), expected_output(x, packed))


@pytest.mark.parametrize("kernel, M", [("gemv", 1), ("gemv", 7), ("gemm", 33)])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_split_binary_layer(kernel, M, granularity, device):
    packed = make_packed(33, 100, 1, parts=2, granularity=granularity, device=device)
    x, bias = random_inputs(M, 33, 100, 8, device)
    assert_matches(run(x, packed, bias, kernel=kernel), expected_output(x, packed, bias))


@pytest.mark.parametrize("bits", [1, 2], ids=["W1", "W2"])
@pytest.mark.parametrize("kernel, M", [("gemv", 1), ("gemm", 7)])
def test_arbitrary_words_decode_like_unpack(kernel, M, bits, device):
    # Random words: every ternary field value (3 decodes as 0) and random padding bits past K.
    generator = torch.Generator().manual_seed(15)
    data = random_words((1, 33, packing.words_per_row(100, bits)), generator)
    packed = packing.PackedWeight(data, torch.rand(1, 33, generator=generator), bits, 100).to(device)
    x, _ = random_inputs(M, 33, 100, 15, device)
    assert_matches(run(x, packed, kernel=kernel), expected_output(x, packed))


INT8_CASES = [
    pytest.param("gemv", 1, None, id="gemv-M1"),
    pytest.param("gemv", 16, None, id="gemv-M16"),
    pytest.param("gemm", 7, None, id="gemm-M7"),
    pytest.param("gemm", 33, None, id="gemm-M33"),
    pytest.param("gemv", 7, dict(kernel="gemv", BLOCK_M=8, BLOCK_N=16, BLOCK_KW=1, SPLIT_K=3), id="gemv-M7-split"),
    pytest.param("gemm", 33, dict(kernel="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=2),
                 id="gemm-M33-split"),
]


@pytest.mark.parametrize("parts, bits", [(1, 1), (1, 2), (2, 1)], ids=["W1", "W2", "W1x2"])
@pytest.mark.parametrize("kernel, M, config", INT8_CASES)
def test_int8_activations_are_exact_integers(kernel, M, config, parts, bits, device):
    if config is not None:
        config = dict(config, num_warps=4, num_stages=1)
    packed = make_packed(33, 100, bits, parts=parts, device=device)
    unit = packing.PackedWeight(packed.data, torch.ones_like(packed.scale), bits, 100)
    q = torch.randint(-128, 128, (M, 100), generator=torch.Generator().manual_seed(9), dtype=torch.int8).to(device)
    out = run(q, unit, x_scale=torch.ones((), device=device), kernel=kernel, config=config)
    assert torch.equal(out, exact_int8_output(q, unit).float())


@pytest.mark.parametrize("parts, bits", [(1, 1), (1, 2), (2, 1), (2, 2)], ids=["W1", "W2", "W1x2", "W2x2"])
@pytest.mark.parametrize("kernel, M", [("gemv", 1), ("gemv", 2), ("gemm", 7)])
def test_arbitrary_words_with_int8_activations_are_exact(kernel, M, parts, bits, device):
    # Random words put every field value (ternary 3 decodes as 0) in every lane of a word; int8 x with unit scales
    # makes each output an integer the kernels must hit exactly.
    generator = torch.Generator().manual_seed(21)
    data = random_words((parts, 33, packing.words_per_row(100, bits)), generator)
    unit = packing.PackedWeight(data, torch.ones(parts, 33), bits, 100).to(device)
    q = torch.randint(-128, 128, (M, 100), generator=generator, dtype=torch.int8).to(device)
    out = run(q, unit, x_scale=torch.ones((), device=device), kernel=kernel)
    assert torch.equal(out, exact_int8_output(q, unit).float())


@pytest.mark.parametrize("parts, bits", [(1, 1), (1, 2), (2, 2)], ids=["W1", "W2", "W2x2"])
def test_gemv_int32_accumulator_is_exact(parts, bits, monkeypatch, device):
    # Past FP32_EXACT_MAX_K the gemv sums int8 x in int32 (its own decode of the ternary fields): lowered here so that
    # a small K takes that path, on random words.
    monkeypatch.setattr(pm, "FP32_EXACT_MAX_K", 50)
    generator = torch.Generator().manual_seed(22)
    data = random_words((parts, 33, packing.words_per_row(100, bits)), generator)
    unit = packing.PackedWeight(data, torch.ones(parts, 33), bits, 100).to(device)
    q = torch.randint(-128, 128, (1, 100), generator=generator, dtype=torch.int8).to(device)
    out = run(q, unit, x_scale=torch.ones((), device=device), kernel="gemv")
    assert torch.equal(out, exact_int8_output(q, unit).float())


@pytest.mark.parametrize("kernel, M", [("gemv", 1), ("gemm", 33)])
def test_int8_activations_with_scales_match_the_reference_epilogue(kernel, M, device):
    packed = make_packed(33, 100, 2, granularity="row", device=device)
    generator = torch.Generator().manual_seed(10)
    q = torch.randint(-127, 128, (M, 100), generator=generator, dtype=torch.int8).to(device)
    x_scale = (torch.rand(M, generator=generator) + 0.5).to(device)
    bias = torch.randn(33, generator=generator).to(device)
    out = run(q, packed, bias, x_scale=x_scale, kernel=kernel)
    reference_out = packed_linear(q, packed, bias, x_scale=x_scale, backend="reference")
    torch.testing.assert_close(out, reference_out, rtol=1e-6, atol=1e-6)
    assert_matches(out, expected_output(q.float(), packed, bias, x_scale))


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_quantization_kernel_is_bit_exact(per_token, dtype, device):
    generator = torch.Generator().manual_seed(11)
    x = (torch.randn(5, 300, generator=generator) * 3).to(device, dtype)
    x[1] = 0.0
    # Exact ties of x / scale (127 * k / 2 / 127 = k / 2) check round-half-to-even.
    x[2, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5], dtype=dtype)
    q, scale = pm.quantize_int8(x, per_token=per_token)
    q_ref, scale_ref = quantize_int8_reference(x, per_token=per_token)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)
    assert q_ref[2, 1:8].tolist() == [0, 2, 2, 0, -2, -2, 4]


@pytest.mark.parametrize("act_quant", ["per_token", "per_tensor"])
def test_packed_linear_with_int8_activations(act_quant, device):
    packed = make_packed(33, 100, 1, granularity="row", device=device)
    x, bias = random_inputs(6, 33, 100, 12, device)
    x = x.reshape(2, 3, 100)
    out = packed_linear(x, packed, bias, act_quant=act_quant, backend="triton")
    reference_out = packed_linear(x, packed, bias, act_quant=act_quant, backend="reference")
    assert out.shape == (2, 3, 33) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_out, rtol=1e-6, atol=1e-6)
    # int8 activations stay close to the float result (absmax 8-bit: about 1% relative error).
    full = F.linear(x, packed.dequantize(), bias)
    assert (out - full).norm() / full.norm() < 2e-2


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_packed_linear_keeps_leading_dims(backend, device):
    packed = make_packed(33, 96, 2, device=device)
    x, bias = random_inputs(6, 33, 96, 13, device)
    x = x.reshape(2, 3, 96)
    out = packed_linear(x, packed, bias, backend=backend)
    assert out.shape == (2, 3, 33)
    assert_matches(out.reshape(6, 33), expected_output(x.reshape(6, 96), packed, bias))


def test_reference_backend_is_dequantize_then_matmul():
    packed = make_packed(9, 40, 1, granularity="row")
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(14))
    assert torch.equal(packed_linear(x, packed, backend="reference"), F.linear(x, packed.dequantize()))


def test_empty_batch(device):
    packed = make_packed(9, 40, 1, device=device)
    x = torch.zeros(0, 40, device=device)
    assert pm.packed_matmul(x, packed.data, packed.scale, bits=1, in_features=40).shape == (0, 9)


@pytest.mark.parametrize("M", [1, 2, 16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_default_configs_on_a_small_shape(M, dtype, device):
    # The configs an H100 (sm_90, 132 SMs) would pick, on a small shape: split-K engages (few tiles), tiles shrink.
    packed = make_packed(33, 100, 1, granularity="row", device=device)
    config = pm.default_config(M, 33, 100, 1, dtype=dtype, target=H100)
    x, _ = random_inputs(M, 33, 100, M, device, dtype)
    assert_matches(run(x, packed, config=config), expected_output(x, packed))


def test_default_config_heuristics():
    assert pm.choose_kernel(1) == "gemv" and pm.choose_kernel(2) == "gemv" and pm.choose_kernel(3) == "gemm"
    big = pm.default_config(1, 28672, 4096, 1, target=H100)
    assert big["kernel"] == "gemv" and big["SPLIT_K"] == 1
    down = pm.default_config(1, 4096, 14336, 1, target=H100)
    assert down["SPLIT_K"] > 1 and math.ceil(4096 / down["BLOCK_N"]) * down["SPLIT_K"] >= 132
    # Both layers offer more tiles x steps than SMs: neither tile is shrunk, so they are the same base tile.
    assert math.ceil(4096 / down["BLOCK_N"]) * math.ceil(14336 / 32 / down["BLOCK_KW"]) >= 132
    assert (down["BLOCK_N"], down["BLOCK_KW"]) == (big["BLOCK_N"], big["BLOCK_KW"])
    small = pm.default_config(1, 768, 768, 1, target=H100)
    small_steps = math.ceil(768 / 32 / small["BLOCK_KW"])
    assert math.ceil(768 / small["BLOCK_N"]) * min(small["SPLIT_K"], small_steps) >= 132
    skinny = pm.default_config(16, 4096, 14336, 2, target=H100)
    assert skinny["kernel"] == "gemm" and skinny["BLOCK_M"] == 16 and skinny["BLOCK_K"] % 16 == 0
    large = pm.default_config(4096, 4096, 4096, 1, target=H100)
    assert large["BLOCK_M"] == 128 and large["SPLIT_K"] == 1
    # Two ternary parts: half the rows and half the words per step of one part (four decoded words per pair).
    one, two = (pm.default_config(1, 28672, 4096, 2, parts=parts, target=H100) for parts in (1, 2))
    assert (two["BLOCK_N"], two["BLOCK_KW"]) == (one["BLOCK_N"] // 2, one["BLOCK_KW"] // 2)
    # Two parts (a split pair) stream twice the words per output: the tile halves its rows.
    assert pm.default_config(1, 4096, 14336, 1, parts=2, target=H100)["BLOCK_N"] == down["BLOCK_N"] // 2
    # The same problem on each target takes that target's table (spill-free defaults, compile gate) and SM count.
    medium = {name: pm.default_config(64, 4096, 4096, 2, parts=2, target=target)
              for name, target in configs.TARGETS.items()}
    assert {name: plan["num_warps"] for name, plan in medium.items()} == {
        "sm_80": 8, "sm_86": 8, "sm_89": 8, "sm_90": 4, "sm_100": 4, "sm_120": 8}
    assert all((plan["BLOCK_M"], plan["BLOCK_N"], plan["BLOCK_K"]) == (64, 128, 64) for plan in medium.values())
    assert pm.default_config(4096, 4096, 4096, 2, target=configs.TARGETS["sm_120"])["BLOCK_K"] == 32
    assert pm.default_config(16, 4096, 4096, 2, target=configs.TARGETS["sm_120"])["BLOCK_K"] == 128
    # Split-K follows the SM count: 32 tiles reach two programs per SM with ceil(2 * 82 / 32) = 6 splits on sm_86
    # and ceil(2 * 132 / 32) = 9 on sm_90.
    split = {name: pm.default_config(64, 4096, 4096, 1, target=configs.TARGETS[name])["SPLIT_K"]
             for name in ("sm_86", "sm_90")}
    assert split == {"sm_86": 6, "sm_90": 9}
    with pytest.raises(TypeError, match="target must be a configs.Target or None, got int"):
        pm.default_config(1, 33, 100, 1, target=132)
    with pytest.raises(ValueError, match="bucket must be one of .*, got 'huge'"):
        configs.packed_gemm("huge", H100)
    with pytest.raises(TypeError, match="target must be a Target, got NoneType"):
        configs.packed_gemm("medium", None)
    with pytest.raises(ValueError, match="the gemv kernel takes M <= 16, got M=17"):
        pm.default_config(17, 33, 100, 1, kernel="gemv")
    with pytest.raises(ValueError, match="kernel must be 'auto', 'gemv' or 'gemm', got 'dense'"):
        pm.default_config(1, 33, 100, 1, kernel="dense")


def test_launcher_rejects_bad_arguments():
    packed = make_packed(9, 40, 1)
    x = torch.randn(3, 40)
    call = dict(bits=1, in_features=40)
    with pytest.raises(TypeError, match="x must be"):
        pm.packed_matmul(x.double(), packed.data, packed.scale, **call)
    with pytest.raises(ValueError, match="x must be 2-D"):
        pm.packed_matmul(x[:, :39], packed.data, packed.scale, **call)
    with pytest.raises(TypeError, match="int32"):
        pm.packed_matmul(x, packed.data.long(), packed.scale, **call)
    with pytest.raises(ValueError, match="data must be"):
        pm.packed_matmul(x, packed.data, packed.scale, bits=2, in_features=40)
    with pytest.raises(ValueError, match="contiguous"):
        wide = torch.zeros(1, 9, 4, dtype=torch.int32)[:, :, ::2]
        pm.packed_matmul(x, wide, packed.scale, **call)
    with pytest.raises(ValueError, match="scale must be"):
        pm.packed_matmul(x, packed.data, torch.ones(1, 3), **call)
    with pytest.raises(ValueError, match="bias must have shape"):
        pm.packed_matmul(x, packed.data, packed.scale, torch.ones(8), **call)
    with pytest.raises(ValueError, match="needs x_scale"):
        pm.packed_matmul(x.to(torch.int8), packed.data, packed.scale, **call)
    with pytest.raises(ValueError, match="x_scale must have"):
        pm.packed_matmul(x, packed.data, packed.scale, x_scale=torch.ones(2), **call)
    with pytest.raises(ValueError, match="out must be"):
        pm.packed_matmul(x, packed.data, packed.scale, out=torch.empty(3, 8), **call)
    with pytest.raises(ValueError, match="BLOCK_K"):
        config = dict(kernel="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_K=48, GROUP_M=1, SPLIT_K=1, num_warps=4,
                      num_stages=1)
        pm.packed_matmul(x, packed.data, packed.scale, config=config, **call)
    with pytest.raises(ValueError, match="act_quant"):
        packed_linear(x, packed, act_quant="per_channel")
    with pytest.raises(ValueError, match="neither int8 x nor x_scale"):
        packed_linear(x, packed, x_scale=torch.ones(()), act_quant="per_token")
    with pytest.raises(TypeError, match="PackedWeight"):
        packed_linear(x, packed.data)


@triton.jit
def _unpack_tile_kernel(words_ptr, out_ptr, BITS: tl.constexpr, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    BLOCK_KW: tl.constexpr = BLOCK_K // (32 // BITS)
    rows = tl.arange(0, BLOCK_N)[:, None]
    words = tl.load(words_ptr + rows * BLOCK_KW + tl.arange(0, BLOCK_KW)[None, :])
    codes = pm._unpack_tile(words, BITS, DTYPE, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], codes.to(tl.float32))


@pytest.mark.parametrize("bits", [1, 2], ids=["W1", "W2"])
@pytest.mark.parametrize("dtype", [tl.bfloat16, tl.float16, tl.float32, tl.int8], ids=str)
def test_tile_unpack_bit_patterns_decode_like_unpack(dtype, bits):
    # The GEMM's codes tile in every dot dtype, whichever dtype the interpreter's GEMM itself uses: random words
    # (every ternary field value, 3 decodes as 0), each code exact.
    if not pm.INTERPRET:
        pytest.skip("the unpack tile is checked in the interpreter")
    generator = torch.Generator().manual_seed(16)
    block_n, block_k = 8, 64
    words = random_words((block_n, block_k // (32 // bits)), generator)
    out = torch.full((block_n, block_k), float("nan"))
    _unpack_tile_kernel[(1,)](words, out, bits, dtype, block_n, block_k)
    assert torch.equal(out, packing.unpack_codes(words, bits, block_k, torch.float32))


@pytest.mark.parametrize("codes_left", [True, False], ids=["codes-left", "x-left"])
@pytest.mark.parametrize("parts, bits", [(1, 1), (1, 2), (2, 1)], ids=["W1", "W2", "W1x2"])
def test_gemm_tile_orientations_match(codes_left, parts, bits, monkeypatch, device):
    # The GEMM computes x @ c^T (mma.sync targets) or (c @ x^T)^T (wgmma / tcgen05 targets, the interpreter):
    # both orientations, float and exact int8.
    monkeypatch.setattr(pm.configs, "packed_codes_left", lambda target: codes_left)
    packed = make_packed(33, 100, bits, parts=parts, device=device)
    x, bias = random_inputs(33, 33, 100, 17, device)
    assert_matches(run(x, packed, bias, kernel="gemm"), expected_output(x, packed, bias))
    unit = packing.PackedWeight(packed.data, torch.ones_like(packed.scale), bits, 100)
    q = torch.randint(-128, 128, (33, 100), generator=torch.Generator().manual_seed(17), dtype=torch.int8).to(device)
    out = run(q, unit, x_scale=torch.ones((), device=device), kernel="gemm")
    assert torch.equal(out, exact_int8_output(q, unit).float())
