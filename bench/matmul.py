"""Benchmark the fused quantized linear against cuBLAS bf16, the eager fake-quant reference and its torch.compile.

Providers: ``cublas`` (``F.linear``, bf16 autocast), ``reference`` (``triton_bq.reference.quant_linear``, eager),
``compiled`` (``torch.compile`` of the reference), ``triton_bq`` (the fused kernels on their default ``codes``
paths: weight and activation codes written once per GEMM, then streamed, the forward's codes in the compute dtype),
``triton_bq_int8`` (the same with the forward on int8 tensor cores where the codes fit int8,
``triton_bq.kernels.linear.forward_dot``) and ``triton_bq_fused`` (the same kernels quantizing both operands inside
the main loops: ``act_path`` / ``weight_path``).
Modes: ``fwd``, ``bwd``, ``full`` (fwd+bwd). Every provider runs under ``torch.autocast("cuda", bfloat16)`` with bf16
activations and latent weights of ``--weight-dtype`` (fp32 master weights by default, as in mixed-precision QAT).

Each configuration is verified against the reference before it is timed; a failed check records no timings.
Results: a printed table, ``bench/results/matmul-<device>-<time>.csv`` (device, versions, git sha on every row) and
a PNG plot beside it. Without a GPU the script says so, runs a tiny interpreter correctness check and exits 0.

``--inference`` switches to the packed 1-bit / 2-bit inference providers (bf16 cuBLAS, dequantize-then-matmul, the
packed kernels, over M = 1 .. 4096); every other option is then that of ``bench/inference.py``.

    python bench/matmul.py --quick                      # BERT-base + two LLM shapes, fwd+bwd only
    python bench/matmul.py --shapes bert-base --modes fwd,bwd,full --acts none,a8 --methods bwn,twn
    python bench/matmul.py --inference --shapes llm --ms 1,4,16
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, choose, git_sha, select_shapes, write_csv  # noqa: E402

# (group, name) -> (N, K); M is the token count (--tokens).
SHAPES = {
    ("bert-base", "768x768"): (768, 768),
    ("bert-base", "3072x768"): (3072, 768),
    ("bert-base", "768x3072"): (768, 3072),
    ("bert-large", "1024x1024"): (1024, 1024),
    ("bert-large", "4096x1024"): (4096, 1024),
    ("bert-large", "1024x4096"): (1024, 4096),
    ("llm", "4096x4096"): (4096, 4096),
    ("llm", "14336x4096"): (14336, 4096),
    ("llm", "4096x14336"): (4096, 14336),
}
QUICK_SHAPES = ["bert-base", "llm/4096x4096", "llm/14336x4096"]
PROVIDERS = ["cublas", "reference", "compiled", "triton_bq", "triton_bq_int8", "triton_bq_fused"]
MODES = ["fwd", "bwd", "full"]
GEMMS_PER_MODE = {"fwd": 1, "bwd": 2, "full": 3}
# Activation quantizers: A8 symmetric with a learnable clip (BinaryBERT / TernaryBERT), A4 LSQ.
ACTS = {"none": {}, "a8": dict(act_method="sym", act_bits=8), "a4": dict(act_method="lsq", act_bits=4)}
# Verification: bf16 outputs against the eager reference (which also rounds x_hat and w_q to bf16).
VERIFY_MAX_RELATIVE, VERIFY_MIN_SQNR_DB = 3e-2, 30.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="all", help="comma list of groups (bert-base, bert-large, llm), "
                        "group/NxK names (llm/4096x4096) or 'all'")
    parser.add_argument("--tokens", type=int, default=4096, help="M, the number of tokens (default 4096)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    parser.add_argument("--methods", default="bwn,twn", help="comma list of bwn, twn")
    parser.add_argument("--acts", default="none,a8", help=f"comma list of {list(ACTS)}")
    parser.add_argument("--weight-dtype", choices=["fp32", "bf16"], default="fp32", help="latent weight dtype")
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, mode full only")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and the PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.modes = ",".join(QUICK_SHAPES), "full"
    args.providers = choose(args.providers, PROVIDERS, "--providers")
    args.modes = choose(args.modes, MODES, "--modes")
    args.methods = choose(args.methods, ["bwn", "twn"], "--methods")
    args.acts = choose(args.acts, list(ACTS), "--acts")
    args.shape_keys = select_shapes(args.shapes, SHAPES)
    return args


def cpu_check() -> int:
    """No GPU: a tiny interpreter run of the fused op against the reference (forward and every gradient)."""
    from triton_bq.kernels.linear import fused_quant_linear

    from triton_bq import QuantOptions, reference

    failures = 0
    for method in ("bwn", "twn"):
        for act in ("none", "a8", "a4"):
            torch.manual_seed(0)
            x = torch.randn(33, 96)
            weight, bias = torch.randn(40, 96) * 0.5, torch.randn(40)
            clip, step = torch.tensor([-2.0, 2.0]), torch.tensor(0.4)
            grad_y = torch.randn(33, 40)
            options = QuantOptions(weight_method=method, **ACTS[act])
            results = []
            for op in (fused_quant_linear, reference.quant_linear):
                leaves = [t.clone().requires_grad_() for t in (x, weight, bias, clip, step)]
                y = op(leaves[0], leaves[1], leaves[2], options, act_clip=leaves[3], act_step=leaves[4])
                y.backward(grad_y)
                results.append([y] + [leaf.grad for leaf in leaves])
            worst = 0.0
            for got, wanted in zip(*results, strict=True):
                if wanted is not None:
                    worst = max(worst, ((got - wanted).abs().max() / wanted.abs().max().clamp_min(1e-12)).item())
            status = "ok" if worst < 1e-4 else "FAILED"
            failures += status != "ok"
            print(f"  {method} act={act:4s}  max relative error {worst:.1e}  {status}")
    return failures


class Case:
    """Inputs of one (shape, method, act) configuration and the closures of every provider."""

    def __init__(self, tokens, n, k, method, act, weight_dtype, device="cuda"):
        from triton_bq.kernels import linear as kernels_linear

        from triton_bq import QuantOptions, reference

        self.kernels_linear = kernels_linear
        generator = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(tokens, k, device=device, generator=generator).to(torch.bfloat16).requires_grad_()
        self.weight = (torch.randn(n, k, device=device, generator=generator) * 0.05).to(weight_dtype).requires_grad_()
        self.bias = torch.zeros(n, device=device, dtype=weight_dtype, requires_grad=True)
        self.clip = torch.tensor([-2.5, 2.5], device=device, requires_grad=True)
        self.step = torch.tensor(0.4, device=device, requires_grad=True)
        self.grad_y = torch.randn(tokens, n, device=device, generator=generator).to(torch.bfloat16)
        self.options = QuantOptions(weight_method=method, **ACTS[act])
        self.has_act = act != "none"
        self.reference = reference.quant_linear

    def leaves(self):
        return [self.x, self.weight, self.bias] + ([self.clip, self.step] if self.has_act else [])

    def forward_fn(self, provider, compiled_reference):
        options = self.options
        if provider == "cublas":
            return lambda: torch.nn.functional.linear(self.x, self.weight, self.bias)
        if provider == "reference":
            op = self.reference
        elif provider == "compiled":
            op = compiled_reference
        else:
            path = "fused" if provider == "triton_bq_fused" else "codes"
            dot = "int8" if provider == "triton_bq_int8" else "float"

            def op(*args, **kwargs):
                linear = self.kernels_linear
                with linear.act_path(path), linear.weight_path(path), linear.forward_dot(dot):
                    return linear.fused_quant_linear(*args, **kwargs)

        return lambda: op(self.x, self.weight, self.bias, options, act_clip=self.clip, act_step=self.step)


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def run_step(forward, grad_y):
    with autocast():
        y = forward()
    y.backward(grad_y)
    return y


def verify(case, forward, reference_forward):
    """Fused forward and grads against the eager reference; returns (ok, worst relative error, worst SQNR)."""
    results = []
    for fn in (forward, reference_forward):
        for leaf in case.leaves():
            leaf.grad = None
        y = run_step(fn, case.grad_y)
        results.append([y.detach().float()] + [leaf.grad.float() for leaf in case.leaves()[:2]])
    worst_relative, worst_sqnr = 0.0, math.inf
    for got, wanted in zip(*results, strict=True):
        error = (got - wanted).double()
        worst_relative = max(worst_relative, (error.abs().max() / wanted.abs().max().clamp_min(1e-12)).item())
        noise = error.square().sum().item()
        if noise > 0:
            worst_sqnr = min(worst_sqnr, 10 * math.log10(wanted.double().square().sum().item() / noise))
    for leaf in case.leaves():
        leaf.grad = None
    return worst_relative <= VERIFY_MAX_RELATIVE and worst_sqnr >= VERIFY_MIN_SQNR_DB, worst_relative, worst_sqnr


def measure(case, forward, mode, warmup, rep):
    """(median, p20, p80) milliseconds and the peak extra memory (MiB) of one fwd+bwd step."""
    import triton

    leaves = case.leaves()
    if mode == "fwd":
        def fn():
            with autocast():
                forward()
    elif mode == "bwd":
        with autocast():
            y = forward()

        def fn():
            y.backward(case.grad_y, retain_graph=True)
    else:
        def fn():
            run_step(forward, case.grad_y)
    median, low, high = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=leaves,
                                                quantiles=[0.5, 0.2, 0.8])
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_step(forward, case.grad_y)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for leaf in leaves:
        leaf.grad = None
    return median, low, high, peak


def benchmark(args) -> list[dict]:
    import triton

    from triton_bq import reference

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled_reference = torch.compile(reference.quant_linear) if "compiled" in args.providers else None
    weight_dtype = torch.float32 if args.weight_dtype == "fp32" else torch.bfloat16
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                git_sha=git_sha(), timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                weight_dtype=args.weight_dtype, tokens=args.tokens)
    rows = []
    for (group, name) in args.shape_keys:
        n, k = SHAPES[(group, name)]
        for method in args.methods:
            for act in args.acts:
                case = Case(args.tokens, n, k, method, act, weight_dtype)
                reference_forward = case.forward_fn("reference", None)
                for provider in args.providers:
                    forward = case.forward_fn(provider, compiled_reference)
                    ok, relative, sqnr = True, 0.0, math.inf
                    if provider != "cublas":
                        ok, relative, sqnr = verify(case, forward, reference_forward)
                    for mode in args.modes:
                        row = dict(meta, group=group, shape=name, M=args.tokens, N=n, K=k, method=method, act=act,
                                   provider=provider, mode=mode, verified=ok, max_relative_error=relative,
                                   sqnr_db=sqnr)
                        if ok:
                            median, low, high, peak = measure(case, forward, mode, args.warmup, args.rep)
                            flops = 2.0 * args.tokens * n * k * GEMMS_PER_MODE[mode]
                            row.update(ms=median, ms_p20=low, ms_p80=high, tflops=flops / median / 1e9,
                                       peak_extra_mib=peak)
                        rows.append(row)
                        status = f"{row['ms']:.3f} ms" if ok else f"verification FAILED (rel {relative:.2e})"
                        print(f"{group}/{name} {method} {act} {provider:15s} {mode:4s} {status}", flush=True)
                del case
                torch.cuda.empty_cache()
    return rows


def print_table(rows):
    timed = {(r["group"], r["shape"], r["method"], r["act"], r["mode"], r["provider"]): r for r in rows}
    keys = list(dict.fromkeys(key[:5] for key in timed))
    providers = [p for p in PROVIDERS if any(key[5] == p for key in timed)]
    header = f"{'shape':22s} {'w':4s} {'act':4s} {'mode':4s} " + " ".join(f"{p:>15s}" for p in providers)
    header += f" {'ours/cublas':>11s} {'ref/ours':>9s}"
    print("\nmedian ms (do_bench), M = tokens\n" + header + "\n" + "-" * len(header))
    for key in keys:
        cells, ms = [], {}
        for provider in providers:
            row = timed.get(key + (provider,))
            if row is None:
                cells.append(f"{'-':>15s}")
            elif "ms" not in row:
                cells.append(f"{'FAILED':>15s}")
            else:
                ms[provider] = row["ms"]
                cells.append(f"{row['ms']:15.3f}")
        ours = min((ms[p] for p in ("triton_bq", "triton_bq_int8", "triton_bq_fused") if p in ms), default=None)
        ratio = f"{ours / ms['cublas']:11.2f}" if ours and "cublas" in ms else f"{'-':>11s}"
        speedup = f"{ms['reference'] / ours:9.2f}" if ours and "reference" in ms else f"{'-':>9s}"
        print(f"{key[0] + '/' + key[1]:22s} {key[2]:4s} {key[3]:4s} {key[4]:4s} " + " ".join(cells)
              + f" {ratio} {speedup}")


def write_outputs(rows, out: Path) -> Path:
    path = write_csv(rows, out, "matmul")
    plot(rows, path.with_suffix(".png"))
    return path


def plot(rows, path: Path):
    """Bars of each provider's median time relative to cuBLAS bf16 (1.0 line; 1.1 is the fused target), per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [row for row in rows if "ms" in row]
    mode = "full" if any(row["mode"] == "full" for row in timed) else timed[0]["mode"]
    timed = [row for row in timed if row["mode"] == mode]
    panels = list(dict.fromkeys((row["method"], row["act"]) for row in timed))
    shapes = list(dict.fromkeys(f"{row['group']}/{row['shape']}" for row in timed))
    providers = [p for p in PROVIDERS if any(row["provider"] == p for row in timed)]
    lookup = {(f"{r['group']}/{r['shape']}", r["method"], r["act"], r["provider"]): r["ms"] for r in timed}
    relative = "cublas" in providers
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.6 * len(shapes)), 3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(providers)
    for axis, (method, act) in zip(axes[:, 0], panels, strict=True):
        for index, provider in enumerate(providers):
            values = []
            for shape in shapes:
                ms = lookup.get((shape, method, act, provider), math.nan)
                base = lookup.get((shape, method, act, "cublas"), math.nan) if relative else 1.0
                values.append(ms / base)
            axis.bar([i + index * width for i in range(len(shapes))], values, width, label=provider)
        if relative:
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.axhline(1.1, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
        axis.set_ylabel(f"{mode} time / cuBLAS bf16" if relative else f"{mode} ms (median)")
        axis.set_title(f"{method}, act={act}, M={timed[0]['M']}, {timed[0]['device']}", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--inference" in argv:
        import inference

        return inference.main([arg for arg in argv if arg != "--inference"])
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU present: no timings are produced (numbers from the CPU interpreter would be meaningless).")
        print("Running a tiny correctness check of the fused kernels in the Triton interpreter instead:")
        os.environ["TRITON_INTERPRET"] = "1"
        failures = cpu_check()
        print("interpreter check " + ("passed" if not failures else f"FAILED in {failures} configurations"))
        return 1 if failures else 0
    rows = benchmark(args)
    print_table(rows)
    path = write_outputs(rows, args.out)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0 if all(row["verified"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
