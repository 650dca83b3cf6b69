"""Main-loop instruction count per MMA, offline: what each fused GEMM issues besides its tensor-core instructions.

Every launch specialization of the compile gate's grid (default configs, the launchers' own picks for the target)
is compiled for a real GPU target without a GPU, disassembled with the nvdisasm bundled with Triton, and its main
loop found: the innermost backward branch whose body holds the MMA instructions (HGMMA / HMMA / IMMA / IGMMA).
The count is the non-MMA instructions of that body per MMA instruction, next to the same count for a *baseline*:
the same kernel, tile, warps, stages, masks and operand layouts with quantization switched off and every GEMM
operand already in the dot dtype, i.e. a plain ``tl.dot`` of two bf16 / fp16 tiles. A ratio near 1 means
quantizing in the main loop is free for the issue slots; on sm_90 one HGMMA.64xNx16 keeps a sub-partition's tensor
core busy for about N / 2 clocks while its scheduler issues at most one instruction per clock, so a count above
about N / 2 per HGMMA makes the loop issue-bound.

The packed GEMV has no MMA: its K loop (the innermost loop with global loads) is counted as thread instructions
per weight code it reads (each loop instruction issues once per warp for 32 threads), and per byte of packed
weights. A GEMV streams its weights once, so it is memory-bound only while that per-byte count stays under the
GPU's thread-instruction issue rate divided by its memory bandwidth.

    python -m triton_bq.kernels.instruction_count                    # sm_90, the CI grid
    python -m triton_bq.kernels.instruction_count --only "fwd.*bwn"  # a subset (regular expression)
    python -m triton_bq.kernels.instruction_count --markdown         # the table of docs/kernels.md

The environment must not set ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from . import compile_gate, linear

_MMA = re.compile(r"^(HGMMA|HMMA|IMMA|IGMMA|UTCHMMA|UTCIMMA|UTCQMMA)\b")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)")
_GLOBAL_LOAD = re.compile(r"^LDG\b")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
# Constexprs that switch the quantization off in the linear kernels (the baseline).
_PLAIN = {"W_MODE": 0, "W_CODES": False, "ALPHA_PER_ROW": False, "DELTA_PER_ROW": False, "ACT": 0, "ACT_PER_ROW": False,
          "X_CODES": False, "CLIPPED": False, "PARTIALS": False}
# The GEMM operands (and outputs) of each linear kernel, which the baseline gives the dot dtype.
_OPERANDS = {"_quant_linear_fwd_kernel": ("x_ptr", "w_ptr", "y_ptr"),
             "_quant_linear_bwd_x_kernel": ("gy_ptr", "w_ptr", "gx_ptr"),
             "_quant_linear_bwd_w_kernel": ("gy_ptr", "x_ptr", "gw_ptr")}


@dataclass
class LoopCount:
    """The main loop of one compiled kernel: MMA instructions, other instructions, and the MMA's shape."""

    mma: int
    other: int
    mma_name: str
    opcodes: dict

    @property
    def per_mma(self) -> float:
        return self.other / self.mma if self.mma else float("nan")


def nvdisasm_path() -> str:

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (nvdisasm bundled with Triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([nvdisasm_path(), "-c", file.name], check=True, capture_output=True, text=True).stdout


def _loops(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The opcodes of a SASS listing and its loops: (first, last) instruction indices of each backward branch."""
    instructions = []
    labels = {}
    branches = []  # (index of the branch, target label)
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        branch = _BRANCH.search(line)
        if branch:
            branches.append((len(instructions), branch.group(1)))
        instructions.append(match.group(1))
    return instructions, [(labels[target], index) for index, target in branches
                          if target in labels and labels[target] <= index]


def _innermost(sass: str, holds) -> LoopCount | None:
    """Count the innermost loop whose opcodes satisfy ``holds``; None if no loop does."""
    instructions, loops = _loops(sass)
    best = None
    for start, end in loops:
        if holds(instructions[start:end + 1]) and (best is None or end - start < best[1] - best[0]):
            best = (start, end)
    if best is None:
        return None
    body = [op for op in instructions[best[0]:best[1] + 1] if op != "NOP"]
    mmas = [op for op in body if _MMA.match(op)]
    opcodes = {}
    for op in body:
        if not _MMA.match(op):
            name = op.split(".")[0]
            opcodes[name] = opcodes.get(name, 0) + 1
    return LoopCount(len(mmas), len(body) - len(mmas), mmas[0] if mmas else "", opcodes)


def main_loop(sass: str) -> LoopCount | None:
    """Count the innermost loop (label ... backward ``BRA`` to it) that holds MMA instructions; None if none."""
    return _innermost(sass, lambda body: any(_MMA.match(op) for op in body))


def load_loop(sass: str) -> LoopCount | None:
    """Count the innermost loop that loads from global memory and holds no MMA (the packed GEMV's K loop)."""
    return _innermost(sass, lambda body: any(_GLOBAL_LOAD.match(op) for op in body)
                      and not any(_MMA.match(op) for op in body))


@triton.jit
def _baseline_packed_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    CODES_LEFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Plain GEMM with the packed GEMM's operand layouts and orientation, K masked, w in x's dtype: out^T =
    w[BN, BK] @ x^T[BK, BM] when CODES_LEFT (the packed GEMM's codes on the left), else out = x @ w^T."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    acc_dtype = tl.int32 if x_ptr.dtype.element_ty == tl.int8 else tl.float32
    if CODES_LEFT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], acc_dtype)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :], mask=mask_k[None, :], other=0)
        if CODES_LEFT:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None], mask=mask_k[:, None], other=0)
            acc = tl.dot(w, xt, acc)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mask_k[None, :], other=0)
            acc = tl.dot(x, tl.trans(w), acc)
    if CODES_LEFT:
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty))


def _baseline_launch(launch: compile_gate.Launch, option) -> tuple[compile_gate.Launch, object]:
    """The baseline of a recorded launch and config: same kernel (or the packed GEMM's plain twin), quantization
    off, GEMM operands in the dot dtype, same tile, warps and stages."""
    name = launch.kernel.__name__
    names = launch.kernel.arg_names[:len(launch.args)]
    if name in _OPERANDS:
        arguments = dict(zip(names, launch.args, strict=True))
        dot_dtype = arguments[_OPERANDS[name][2 if name == "_quant_linear_fwd_kernel" else 0]].dtype
        int8 = launch.constexprs.get("INT8", False)
        for operand in _OPERANDS[name]:
            # An int8 forward's baseline is a plain int8 dot (same MMA kind); its output keeps its dtype.
            if not (int8 and operand != "y_ptr"):
                arguments[operand] = arguments[operand].to(dot_dtype)
        constexprs = dict(launch.constexprs)
        constexprs.update((key, value) for key, value in _PLAIN.items() if key in constexprs)
        if int8:  # the int8 codes are the plain operands: streamed as they are
            constexprs.update(W_MODE=1, W_CODES=True, X_CODES=True)
        return compile_gate.Launch(launch.kernel, tuple(arguments[n] for n in names), constexprs, (option,)), option
    if name == "_packed_gemm_kernel":
        arguments = dict(zip(names, launch.args, strict=True))
        x = arguments["x_ptr"]
        n, k = int(arguments["N"]), int(arguments["K"])
        w = torch.zeros(n, k, dtype=x.dtype)
        out = torch.zeros(x.shape[0], n, dtype=torch.int32 if x.dtype == torch.int8 else x.dtype)
        blocks = {key: value for key, value in option.kwargs.items() if key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        plain = triton.Config(blocks, num_warps=option.num_warps, num_stages=option.num_stages)
        args = (x, w, out, x.shape[0], n, k, x.stride(0), w.stride(0), out.stride(0))
        constexprs = dict(CODES_LEFT=launch.constexprs["CODES_LEFT"])
        return compile_gate.Launch(_baseline_packed_kernel, args, constexprs, (plain,)), plain
    return None, None


def _compiled(target: str, launch: compile_gate.Launch, option):
    backend = compile_gate._backend(target)
    signature, constexprs, attrs, options = compile_gate._bind(launch, option, backend)
    source = triton.compiler.ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=backend.target, options=options.__dict__)


@dataclass
class Row:
    """One specialization's count and its baseline's."""

    target: str
    kernel: str
    setup: str
    config: str
    mma_kind: str
    count: LoopCount | None
    baseline: LoopCount | None
    error: str = ""
    default_paths: bool = True  # the launchers' default weight and activation paths (or none to choose)

    @property
    def ratio(self) -> float:
        if self.count is None or self.baseline is None or not self.baseline.per_mma:
            return float("nan")
        return self.count.per_mma / self.baseline.per_mma


# Filled in the parent before the pool forks its workers: (job, baseline key) per GEMM specialization, and the
# baseline launches by key.
_JOBS: list = []
_BASELINES: dict = {}


def _count_baseline(target: str, key: str) -> LoopCount | None:
    launch, option = _BASELINES[key]
    return main_loop(disassemble(_compiled(target, launch, option).asm["cubin"]))


def _count_job(index: int) -> Row:
    job, _ = _JOBS[index]
    result = job.result
    row = Row(job.target, result.kernel, _short_setup(result.setups[0]), result.config, "", None, None,
              default_paths=any(_on_default_paths(setup) for setup in result.setups))
    try:
        compiled = _compiled(job.target, job.launch, job.option)
        row.mma_kind = compile_gate._mma_kind(compiled.asm.get("ttgir", ""))
        row.count = main_loop(disassemble(compiled.asm["cubin"]))
    except Exception as error:  # reported in the table
        row.error = compile_gate._error_text(error)
    return row


def _check_target(target: str) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the instruction count needs TRITON_INTERPRET unset (the interpreter replaces compilation)")
    if target not in compile_gate._target_names():
        raise ValueError(f"unknown target {target!r}; choose from {compile_gate._target_names()}")


@functools.cache
def _grid_jobs(target: str, only: str | None) -> tuple:
    """The compile gate's jobs of the CI grid on ``target`` (default configs), recorded once for the GEMM and the
    GEMV counts."""
    return tuple(compile_gate.collect([target], False, False, only))


# The GEMV jobs, filled in the parent before the pool forks its workers.
_GEMV_JOBS: list = []


@dataclass
class GemvRow:
    """The packed GEMV's K loop on one specialization: thread instructions per weight code it unpacks."""

    target: str
    setup: str
    config: str
    bits: int
    codes_per_step: int  # weight codes one program reads per loop iteration (every part)
    num_warps: int
    loop: LoopCount | None = None
    error: str = ""

    @property
    def per_code(self) -> float:
        """Thread instructions per weight code: each loop instruction issues once per warp, for 32 threads."""
        if self.loop is None:
            return float("nan")
        return self.loop.other * 32 * self.num_warps / self.codes_per_step

    @property
    def per_byte(self) -> float:
        """Thread instructions per byte of packed weights streamed (``8 / bits`` codes per byte)."""
        return self.per_code * 8 / self.bits


def _gemv_row(job) -> GemvRow:
    values = {**job.launch.constexprs, **job.option.kwargs}
    bits = values["BITS"]
    codes = values["BLOCK_N"] * values["BLOCK_KW"] * (32 // bits) * values["PARTS"]
    return GemvRow(job.target, _short_setup(job.result.setups[0]), job.result.config, bits, codes,
                   job.option.num_warps)


def _count_gemv(index: int) -> GemvRow:
    job = _GEMV_JOBS[index]
    row = _gemv_row(job)
    try:
        row.loop = load_loop(disassemble(_compiled(job.target, job.launch, job.option).asm["cubin"]))
    except Exception as error:  # reported in the table
        row.error = compile_gate._error_text(error)
    return row


def run_gemv(target: str = "sm_90", only: str | None = None, workers: int | None = None) -> list[GemvRow]:
    """Compile and count the packed GEMV specializations of the CI grid on ``target`` (default configs)."""
    _check_target(target)
    _GEMV_JOBS[:] = [job for job in _grid_jobs(target, only) if job.launch.kernel.__name__ == "_packed_gemv_kernel"]
    if not _GEMV_JOBS:
        return []
    with ProcessPoolExecutor(workers or os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_count_gemv, range(len(_GEMV_JOBS)), chunksize=1))


def _on_default_paths(setup: str) -> bool:
    """Whether a grid setup runs the linear launcher's default activation and weight paths."""
    if not setup.startswith("linear"):
        return False
    fields = dict(item.split("=", 1) for item in setup.split()[1:])
    return ((fields["act"] == "none" or fields["path"] == linear._ACT_PATH)
            and (fields["weight_method"] == "None" or fields["wpath"] == linear._WEIGHT_PATH)
            and fields.get("fdot", linear._FORWARD_DOT) == linear._FORWARD_DOT)


def _short_setup(setup: str) -> str:
    """'linear compute=bf16 weight_method=twn granularity=row act=sym8 path=fused ste=identity' -> compact text."""
    fields = dict(item.split("=", 1) for item in setup.split()[1:])
    if setup.startswith("packed"):
        return f"packed W{fields['bits']} x={fields['dtype']} M={fields['M']}"
    weight = "fp"
    if fields["weight_method"] != "None":
        weight = f"{fields['weight_method']}-{fields['granularity']}/{fields['wpath']}"
    act = fields["act"] if fields["act"] == "none" else f"{fields['act']}/{fields['path']}"
    dot = " dot=float" if fields.get("fdot") == "float" else ""
    return f"{fields['compute']} w={weight} act={act}{dot}"


def collect(target: str = "sm_90", only: str | None = None) -> list:
    """(job, baseline key) per GEMM specialization of the CI grid on ``target``, default configs only. IEEE float32
    dots (the ``fp32`` compute setup) run on FMA units, without MMA instructions: not counted."""
    jobs = []
    for job in _grid_jobs(target, only):
        name = job.launch.kernel.__name__
        if name not in _OPERANDS and name != "_packed_gemm_kernel":
            continue
        if all(" compute=fp32 " in setup for setup in job.result.setups):
            continue
        baseline, option = _baseline_launch(job.launch, job.option)
        key = None
        if baseline is not None:
            signature, constexprs, attrs, _ = compile_gate._bind(baseline, option, compile_gate._backend(target))
            key = f"{baseline.kernel.__name__}|{compile_gate._describe(signature, constexprs, attrs)}|" \
                  f"{compile_gate._config_name(option)}"
            _BASELINES.setdefault(key, (baseline, option))
        jobs.append((job, key))
    return jobs


def run(target: str = "sm_90", only: str | None = None, workers: int | None = None) -> list[Row]:
    """Compile and count every GEMM specialization (parallel workers); rows in the grid's order."""
    _check_target(target)
    _JOBS[:] = collect(target, only)
    keys = sorted({key for _, key in _JOBS if key is not None})
    # fork: the workers inherit the recorded launches (tensors and JIT functions) without pickling them.
    with ProcessPoolExecutor(workers or os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        baselines = dict(zip(keys, pool.map(functools.partial(_count_baseline, target), keys), strict=True))
        rows = list(pool.map(_count_job, range(len(_JOBS)), chunksize=1))
    for row, (_, key) in zip(rows, _JOBS, strict=True):
        row.baseline = baselines.get(key)
    return rows


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """One line per specialization: kernel, setup, config, MMA, instructions per MMA, baseline, ratio, async."""
    header = ["kernel", "setup", "config", "MMA", "wgmma", "other / MMA", "baseline", "ratio"]
    lines = []
    for row in rows:
        kernel = row.kernel.replace("_quant_linear_", "").replace("_kernel", "").lstrip("_")
        if row.error or row.count is None:
            cells = [kernel, row.setup, row.config, "-", row.mma_kind, row.error or "no MMA loop", "", ""]
        else:
            baseline = f"{row.baseline.per_mma:.2f}" if row.baseline else "-"
            ratio = f"{row.ratio:.2f}x" if row.baseline else "-"
            mma = ".".join(row.count.mma_name.split(".")[:2])
            cells = [kernel, row.setup, row.config, mma, row.mma_kind.replace("wgmma ", ""),
                     f"{row.count.per_mma:.2f}", baseline, ratio]
        lines.append(cells)
    return _table(header, lines, markdown)


def format_gemv_table(rows: list[GemvRow], markdown: bool = False) -> str:
    """One line per GEMV specialization: setup, config, codes per step, instructions per code and per byte."""
    header = ["kernel", "setup", "config", "codes / step", "instructions / code", "instructions / weight byte",
              "most issued"]
    lines = []
    for row in rows:
        if row.error or row.loop is None:
            cells = ["gemv", row.setup, row.config, str(row.codes_per_step), row.error or "no load loop", "", ""]
        else:
            top = sorted(row.loop.opcodes.items(), key=lambda item: -item[1])[:3]
            cells = ["gemv", row.setup, row.config, str(row.codes_per_step), f"{row.per_code:.2f}",
                     f"{row.per_byte:.1f}", ", ".join(f"{name} {count}" for name, count in top)]
        lines.append(cells)
    return _table(header, lines, markdown)


def _table(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(str(cells[i])) for cells in lines + [header]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True))
                     for cells in [header] + lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="sm_90", help="one of sm_80, ..., sm_120 (default sm_90)")
    parser.add_argument("--only", default=None, help="regular expression on 'kernel setup' (a subset)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (docs/kernels.md)")
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="exit 1 if a fused-linear GEMM on the default paths counts more than this times its "
                             "baseline (the lean-loop target is 1.3)")
    args = parser.parse_args(argv)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_bq_count_")
    knobs.cache.dir = os.environ["TRITON_CACHE_DIR"]
    rows = run(args.target, args.only, args.workers)
    gemv_rows = run_gemv(args.target, args.only, args.workers)
    if rows:
        print(format_table(rows, args.markdown))
    if gemv_rows:
        print("\n" if rows else "", end="")
        print(format_gemv_table(gemv_rows, args.markdown))
    failed = [row for row in rows + gemv_rows if row.error]
    if args.max_ratio is not None:
        over = [row for row in rows if row.default_paths and row.count is not None and row.ratio > args.max_ratio]
        for row in over:
            print(f"over {args.max_ratio}x: {row.kernel} {row.setup} {row.config}: {row.ratio:.2f}x")
        failed += over
    if not rows and not gemv_rows:
        print("no GEMM or GEMV specialization matched")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
