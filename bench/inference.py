"""Benchmark packed 1-bit / 2-bit inference matmuls against cuBLAS bf16 and dequantize-then-matmul.

Providers (``y = x @ W^T`` with bf16 activations ``x [M, K]`` and a weight ``W [N, K]``):

- ``cublas_bf16``: ``F.linear`` on the bf16 weight (16 bits per weight).
- ``dequant_w1`` / ``dequant_w2``: unpack the packed binary / ternary weight to bf16, then ``F.linear`` (eager PyTorch,
  ``triton_bq.packed_linear(..., backend="reference")``), every call.
- ``ours_w1`` / ``ours_w2``: the packed-weight Triton kernels (``triton_bq.kernels.packed_matmul``): GEMV for
  M <= 2, tensor-core GEMM above, weights unpacked in registers.
- ``ours_w1_a8`` / ``ours_w2_a8``: the same with int8 activations (per-token absmax quantization kernel included in
  the time, int8 x +-1/0 codes accumulated exactly).

Each (shape, M, provider) is verified against a float32 dequantize-then-matmul before it is timed; a failed check
records no timing. Timings are ``triton.testing.do_bench`` medians (with 20/80 % quantiles). Results: a printed
table, ``bench/results/inference-<device>-<time>.csv`` (device, torch / triton versions, git sha on every row) and a
PNG plot beside it (matplotlib, optional). Without a GPU the script says so, runs a tiny correctness check in the
Triton interpreter and exits 0: it never prints CPU numbers as GPU numbers.

    python bench/inference.py                                  # every shape, M = 1 .. 4096
    python bench/inference.py --shapes llm/4096x14336 --ms 1 --tune   # also sweep a few launch configs

The provider and shape loop is importable: ``make_case``, ``provider_forward``, ``verify``, ``time_forward`` and
``benchmark(providers, shape_keys, ms, ...)`` (``bench/matmul.py`` can call it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, choose, git_sha, select_shapes, write_csv  # noqa: E402

# (group, name) -> (N, K). LLM MLPs both ways (up: 14336x4096, down: 4096x14336) and BERT-base.
SHAPES = {
    ("llm", "4096x4096"): (4096, 4096),
    ("llm", "14336x4096"): (14336, 4096),
    ("llm", "4096x14336"): (4096, 14336),
    ("bert-base", "768x768"): (768, 768),
    ("bert-base", "3072x768"): (3072, 768),
    ("bert-base", "768x3072"): (768, 3072),
}
M_VALUES = (1, 4, 16, 64, 256, 4096)
PROVIDERS = ("cublas_bf16", "dequant_w1", "dequant_w2", "ours_w1", "ours_w2", "ours_w1_a8", "ours_w2_a8")
# Verification against the float32 dequantize-then-matmul: bf16 outputs; int8 activations add ~1 % (absmax 8-bit).
VERIFY_MAX_RELATIVE = {"float": 1e-2, "a8": 3e-2}


def provider_bits(provider: str) -> int | None:
    """1 or 2 for the packed providers, None for cuBLAS."""
    return 1 if "_w1" in provider else 2 if "_w2" in provider else None


@dataclasses.dataclass
class Case:
    """One problem: bf16 ``x [M, K]``, the bf16 weight and its packed binary and ternary versions."""

    M: int
    N: int
    K: int
    x: torch.Tensor
    weight: torch.Tensor
    packed: dict  # bits -> triton_bq.bitpack.PackedWeight

    def reference(self, bits: int) -> torch.Tensor:
        """Float32 dequantize-then-matmul of the packed weight."""
        return self.x.float() @ self.packed[bits].dequantize(torch.float32).T


def make_case(M: int, N: int, K: int, device="cuda", seed: int = 0) -> Case:
    """Random bf16 activations and weight, packed with BWN (1 bit) and TWN (2 bits), per-tensor scales."""
    from triton_bq.bitpack import pack_weight

    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, generator=generator).to(torch.bfloat16)
    weight = (torch.randn(N, K, device=device, generator=generator) * 0.02).to(torch.bfloat16)
    packed = {1: pack_weight(weight.float(), "bwn"), 2: pack_weight(weight.float(), "twn")}
    return Case(M, N, K, x, weight, packed)


def provider_forward(provider: str, case: Case, config: dict | None = None):
    """A zero-argument callable running ``provider`` on ``case`` (``config``: a launch config for ``ours_*``)."""
    import torch.nn.functional as F
    from triton_bq.kernels.packed_matmul import packed_matmul, quantize_int8

    from triton_bq.ops import packed_linear

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "cublas_bf16":
        return lambda: F.linear(case.x, case.weight)
    packed = case.packed[provider_bits(provider)]
    if provider.startswith("dequant"):
        return lambda: packed_linear(case.x, packed, backend="reference")
    options = dict(bits=packed.bits, in_features=packed.in_features, config=config)
    if provider.endswith("_a8"):
        def forward():
            q, scale = quantize_int8(case.x, per_token=True)
            return packed_matmul(q, packed.data, packed.scale, x_scale=scale, out_dtype=torch.bfloat16, **options)

        return forward
    return lambda: packed_matmul(case.x, packed.data, packed.scale, **options)


def verify(provider: str, case: Case, forward) -> tuple[bool, float]:
    """(passed, relative Frobenius error) of ``forward()`` against the float32 dequantize-then-matmul."""
    bits = provider_bits(provider)
    expected = case.x.float() @ case.weight.float().T if bits is None else case.reference(bits)
    got = forward().float()
    relative = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    limit = VERIFY_MAX_RELATIVE["a8" if provider.endswith("_a8") else "float"]
    return bool(torch.isfinite(got).all()) and relative <= limit, relative


def time_forward(forward, warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """``triton.testing.do_bench`` (median, p20, p80) in microseconds."""
    import triton

    median, low, high = triton.testing.do_bench(forward, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return median * 1e3, low * 1e3, high * 1e3


def candidate_configs(provider: str, case: Case) -> list[dict]:
    """The default launch config and a few neighbours (tile sizes, split-K, warps) for ``--tune``."""
    from triton_bq.kernels import configs
    from triton_bq.kernels.packed_matmul import default_config

    bits = provider_bits(provider)
    dtype = torch.int8 if provider.endswith("_a8") else case.x.dtype
    base = default_config(case.M, case.N, case.K, bits, dtype=dtype, target=configs.target_of(case.x.device))
    variants = [base, dict(base, SPLIT_K=max(1, base["SPLIT_K"] // 2)), dict(base, SPLIT_K=base["SPLIT_K"] * 2),
                dict(base, num_warps=8)]
    if base["kernel"] == "gemv":
        variants += [dict(base, BLOCK_N=base["BLOCK_N"] // 2), dict(base, BLOCK_KW=base["BLOCK_KW"] // 2)]
    else:
        variants += [dict(base, BLOCK_N=base["BLOCK_N"] // 2), dict(base, num_stages=base["num_stages"] + 1)]
    unique = []
    for variant in variants:
        if variant not in unique:
            unique.append(variant)
    return unique


def weight_bytes(provider: str, case: Case) -> int:
    bits = provider_bits(provider)
    if bits is None:
        return case.weight.numel() * case.weight.element_size()
    return case.packed[bits].nbytes


def benchmark(providers=PROVIDERS, shape_keys=tuple(SHAPES), ms=M_VALUES, *, warmup=25, rep=100, tune=False,
              log=print) -> list[dict]:
    """Verify then time every (shape, M, provider) on the current CUDA device; one row (dict) per measurement."""
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                git_sha=git_sha(), timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    rows = []
    for group, name in shape_keys:
        n, k = SHAPES[(group, name)]
        for m in ms:
            case = make_case(m, n, k)
            for provider in providers:
                configs = candidate_configs(provider, case) if tune and provider.startswith("ours") else [None]
                best = None
                for config in configs:
                    forward = provider_forward(provider, case, config)
                    ok, relative = verify(provider, case, forward)
                    row = dict(meta, group=group, shape=name, M=m, N=n, K=k, provider=provider, verified=ok,
                               relative_error=relative, weight_bytes=weight_bytes(provider, case),
                               config="" if config is None else repr(config))
                    if ok:
                        median, low, high = time_forward(forward, warmup, rep)
                        moved = row["weight_bytes"] + case.x.numel() * 2 + m * n * 2
                        row.update(us=median, us_p20=low, us_p80=high, gbps=moved / median / 1e3)
                    if best is None or ("us" in row and ("us" not in best or row["us"] < best["us"])):
                        best = row
                rows.append(best)
                if "us" in best:
                    status = f"{best['us']:10.1f} us"
                else:
                    status = f"verification FAILED (relative error {best['relative_error']:.2e})"
                log(f"{group}/{name} M={m:<5d} {provider:12s} {status}")
            del case
            torch.cuda.empty_cache()
    base = {(r["group"], r["shape"], r["M"]): r.get("us") for r in rows if r["provider"] == "cublas_bf16"}
    for row in rows:
        reference = base.get((row["group"], row["shape"], row["M"]))
        if reference and "us" in row:
            row["speedup_vs_cublas"] = reference / row["us"]
    return rows


def print_table(rows, log=print):
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    lookup = {(r["group"], r["shape"], r["M"], r["provider"]): r for r in rows}
    keys = list(dict.fromkeys((r["group"], r["shape"], r["M"]) for r in rows))
    header = f"{'shape':22s} {'M':>5s} " + " ".join(f"{p:>12s}" for p in providers)
    log("\nmedian us (do_bench); in brackets: speedup over cuBLAS bf16\n" + header + "\n" + "-" * len(header))
    for group, shape, m in keys:
        cells = []
        for provider in providers:
            row = lookup.get((group, shape, m, provider))
            if row is None:
                cells.append(f"{'-':>12s}")
            elif "us" not in row:
                cells.append(f"{'FAILED':>12s}")
            else:
                speedup = row.get("speedup_vs_cublas")
                text = f"{row['us']:.1f}" + (f" ({speedup:.1f}x)" if speedup and provider != "cublas_bf16" else "")
                cells.append(f"{text:>12s}")
        log(f"{group + '/' + shape:22s} {m:5d} " + " ".join(cells))


def write_outputs(rows, out: Path) -> Path:
    """The CSV (every row, every field) and, when matplotlib is installed, the PNG beside it."""
    path = write_csv(rows, out, "inference")
    try:
        plot(rows, path.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return path


def plot(rows, path: Path):
    """Median time against M (log-log), one panel per shape, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["group"], r["shape"]) for r in rows))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    columns = min(3, len(shapes))
    lines = math.ceil(len(shapes) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.6 * lines), squeeze=False)
    for axis, (group, shape) in zip(axes.flat, shapes, strict=False):
        for provider in providers:
            points = sorted((r["M"], r["us"]) for r in rows
                            if (r["group"], r["shape"], r["provider"]) == (group, shape, provider) and "us" in r)
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=provider)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("M (tokens)")
        axis.set_ylabel("median us")
        axis.set_title(f"{group} {shape} (N x K)", fontsize=9)
        axis.grid(True, which="both", linewidth=0.3)
    for axis in list(axes.flat)[len(shapes):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"{rows[0]['device']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def cpu_check(log=print) -> int:
    """No GPU: packed kernels (interpreter) against the dequantize-then-matmul reference; returns the failures."""
    from triton_bq.bitpack import pack_weight
    from triton_bq.ops import packed_linear

    failures = 0
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(33, 100, generator=generator)
    for bits, method in ((1, "bwn"), (2, "twn")):
        packed = pack_weight(weight, method, "row")
        for m in (1, 7):
            x = torch.randn(m, 100, generator=generator)
            for act_quant in (None, "per_token"):
                got = packed_linear(x, packed, act_quant=act_quant, backend="triton")
                expected = packed_linear(x, packed, act_quant=act_quant, backend="reference")
                relative = ((got - expected).norm() / expected.norm()).item()
                ok = relative <= 1e-5
                failures += not ok
                log(f"  W{bits} M={m} act={act_quant or 'float'}: relative error {relative:.1e} "
                    f"{'ok' if ok else 'FAILED'}")
    return failures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [f"{group}/{name}" for group, name in SHAPES]
    parser.add_argument("--shapes", default="all", help=f"'all', groups (llm, bert-base) or names {names}")
    parser.add_argument("--ms", default=",".join(map(str, M_VALUES)), help="comma list of M (tokens)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {list(PROVIDERS)}")
    parser.add_argument("--tune", action="store_true", help="time a few launch configs per case, keep the best")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and the PNG")
    args = parser.parse_args(argv)
    args.providers = choose(args.providers, PROVIDERS, "--providers")
    args.ms = [int(m) for m in args.ms.split(",") if m]
    args.shape_keys = select_shapes(args.shapes, SHAPES)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU present: no timings are produced (numbers from the CPU interpreter would be meaningless).")
        print("Running a tiny correctness check of the packed kernels in the Triton interpreter instead:")
        os.environ["TRITON_INTERPRET"] = "1"
        failures = cpu_check()
        print("interpreter check " + ("passed" if not failures else f"FAILED in {failures} configurations"))
        return 1 if failures else 0
    rows = benchmark(args.providers, args.shape_keys, args.ms, warmup=args.warmup, rep=args.rep, tune=args.tune)
    print_table(rows)
    path = write_outputs(rows, args.out)
    print(f"\nwrote {path}")
    return 0 if all(row["verified"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
