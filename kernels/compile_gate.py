"""Offline compile gate: every kernel launch the launchers produce, compiled for real GPU targets without a GPU.

The real launchers run on CPU tensors with ``_common.LAUNCH_RECORDER`` set and ``configs.recording(target)``
active, so they pick exactly the configs they would pick on that target and hand each launch to the recorder
instead of running it. Each distinct specialization (kernel, argument types and alignment, constexprs, config) is
then bound with Triton's own JIT binder for the target's backend and compiled with ``triton.compile`` (bundled
ptxas; fresh cache directory, so ptxas really runs) in parallel worker processes. A specialization fails on a
compile error, shared memory above the target's per-block opt-in limit, or register spills. Specializations of one
target and config that compile to the same PTX code fail too: a launcher passed a value its kernel does not read
(an unused constexpr, the dtype of an unused pointer), which costs a GPU run one JIT compile (and autotuning) more
for the same machine code.

    python -m triton_bq.kernels.compile_gate                 # defaults, sm_80 / sm_89 / sm_90 (the CI gate)
    python -m triton_bq.kernels.compile_gate --all           # every autotune config, every target, full grid
    python -m triton_bq.kernels.compile_gate --targets every                 # defaults, all six targets
    python -m triton_bq.kernels.compile_gate --targets sm_86,sm_90 --configs all

The environment must not set ``TRITON_INTERPRET`` (the interpreter replaces compilation). Exit status 1 when
anything fails. Measured figures are in ``docs/kernels.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import itertools
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from triton_bq.options import QuantOptions

from . import _common, configs, linear, packed_matmul, scales

# Activation quantizers of the grid: (act_method, act_bits, act_signed, act_granularity).
_ACTS = {"none": (None, 8, True, "per_tensor"), "sym8": ("sym", 8, True, "per_tensor"),
         "asym8": ("asym", 8, True, "per_tensor"), "lsq4": ("lsq", 4, True, "per_tensor"),
         "lsq4u": ("lsq", 4, False, "per_tensor"), "asymlsq4": ("asym_lsq", 4, False, "per_tensor"),
         "sym8tok": ("sym", 8, True, "per_token"), "asym8tok": ("asym", 8, True, "per_token")}
# Compute setups: (x dtype, latent weight dtype, autocast dtype or None, float32 matmul precision).
_COMPUTE = {
    "bf16-autocast": ("bfloat16", "float32", "bfloat16", "highest"),  # mixed-precision training, bf16 activations
    "bf16-autocast-fp32-x": ("float32", "float32", "bfloat16", "highest"),  # fp32 activations under autocast
    "bf16": ("bfloat16", "bfloat16", None, "highest"),
    "fp32": ("float32", "float32", None, "highest"),
    "fp16-autocast": ("float16", "float32", "float16", "highest"),
    "fp16": ("float16", "float16", None, "highest"),
    "fp32-tf32": ("float32", "float32", None, "high"),
}
DEFAULT_TARGETS = ("sm_80", "sm_89", "sm_90")


@dataclass
class Launch:
    """One recorded launch: the JIT kernel, its positional arguments, constexprs and the config tuple offered."""

    kernel: object
    args: tuple
    constexprs: dict
    configs: tuple
    setup: str = ""


@dataclass
class Result:
    target: str
    kernel: str
    specialization: str
    config: str
    default: bool
    setups: list = field(default_factory=list)
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    mma: str = ""
    error: str = ""
    code: str = ""  # SHA-1 of the PTX code (``_ptx_code``): the same for two specializations, the same cubin
    seconds: float = 0.0
    # Seconds per compiler stage (Triton's compilation listener: "make_ir", "ttir", ..., "cubin" = ptxas).
    stages: dict = field(default_factory=dict)

    def failure(self, shared_limit: int) -> str:
        if self.error:
            return "compile error"
        if self.shared > shared_limit:
            return f"shared {self.shared} > {shared_limit}"
        if self.spill_stores or self.spill_loads:
            return f"spills {self.spill_stores}/{self.spill_loads} B"
        return ""


_WEIGHTS = [("bwn", "tensor"), ("bwn", "row"), ("twn", "tensor"), ("twn", "row")]


def _grid(full: bool):
    """User-level setups (``QuantOptions`` of the fused launcher ``fused_quant_linear``) the launchers run.

    ``full``: the product of every compute setup, weight quantizer, STE, activation quantizer and activation path.
    Otherwise (the CI grid) every (compute, activation, path) combination of the usual training setups once,
    with the weight quantizer and STE cycling through theirs, so each option value still meets each dtype.
    """
    if full:
        weights = _WEIGHTS + [(None, "tensor")]
        for compute, (method, granularity), act in itertools.product(_COMPUTE, weights, _ACTS):
            if method is None and act == "none":
                continue
            for path, wpath in itertools.product(("fused", "codes") if act != "none" else ("codes",),
                                                 ("fused", "codes") if method is not None else ("codes",)):
                for ste, fdot in itertools.product(("identity", "clipped") if method is not None else ("identity",),
                                                   ("int8", "float")):
                    yield dict(compute=compute, weight_method=method, granularity=granularity, act=act, path=path,
                               wpath=wpath, fdot=fdot, ste=ste)
        return
    computes = ["bf16-autocast", "bf16-autocast-fp32-x", "bf16", "fp32"]
    combinations = [(act, path) for act in ("none", "sym8", "asym8", "lsq4", "asymlsq4", "asym8tok")
                    for path in (("fused", "codes") if act != "none" else ("codes",))]
    for index, (compute, (act, path)) in enumerate(itertools.product(computes, combinations)):
        if act == "asym8tok" and compute not in ("bf16-autocast", "bf16"):
            continue  # per-token scales change no dtype handling: two compute setups cover them
        # Two setups per combination: every weight quantizer meets every dtype and activation, on both weight
        # paths (streamed codes, the default, and codes made in the main loops).
        for turn in range(2):
            method, granularity = _WEIGHTS[(index + 2 * turn) % len(_WEIGHTS)]
            ste = ("identity", "clipped")[(index + turn) % 2]
            wpath = ("codes", "fused")[turn]
            # The forward's float dot (the default) and, in pure bf16, its int8 twin (where the codes fit int8).
            fdot = "int8" if compute == "bf16" else "float"
            yield dict(compute=compute, weight_method=method, granularity=granularity, act=act, path=path,
                       wpath=wpath, fdot=fdot, ste=ste)


def _run_linear(setup: dict) -> None:
    """Forward and backward of one setup on small CPU tensors (the recorder swallows every kernel launch)."""

    x_dtype, w_dtype, autocast, precision = (getattr(torch, name) if name in ("float32", "bfloat16", "float16")
                                             else name for name in _COMPUTE[setup["compute"]])
    act_method, act_bits, act_signed, act_granularity = _ACTS[setup["act"]]
    # Multiples of 16 like real layers, so the pointer / stride alignment specializations are the usual ones.
    x = torch.zeros(64, 128, dtype=x_dtype, requires_grad=True)
    weight = torch.full((96, 128), 0.5, dtype=w_dtype, requires_grad=True)
    bias = torch.zeros(96, dtype=w_dtype, requires_grad=True)
    clip = torch.tensor([-2.0, 2.0], requires_grad=True)
    step = torch.tensor(0.25, requires_grad=True)
    saved_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with linear.act_path(setup["path"]), linear.weight_path(setup["wpath"]), linear.forward_dot(setup["fdot"]), \
                torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            options = QuantOptions(setup["weight_method"], setup["granularity"], setup["ste"], act_method, act_bits,
                                   act_signed, act_granularity=act_granularity)
            y = linear.fused_quant_linear(x, weight, bias, options, act_clip=clip, act_step=step)
        y.backward(torch.zeros_like(y))
    finally:
        torch.set_float32_matmul_precision(saved_precision)


def _packed_grid(full: bool):
    dtypes = ["bfloat16", "int8", "float16", "float32"] if full else ["bfloat16", "int8"]
    ms = [1, 2, 16, 64, 4096] if full else [1, 16, 4096]
    for dtype, m, bits, parts in itertools.product(dtypes, ms, (1, 2), (1, 2) if full else (1,)):
        yield dict(dtype=dtype, M=m, bits=bits, parts=parts)


def _run_packed(setup: dict) -> None:

    n, k = 4096, 4096
    words = k // (32 // setup["bits"])
    data = torch.zeros(setup["parts"], n, words, dtype=torch.int32)
    scale = torch.ones(setup["parts"], n)
    bias = torch.zeros(n)
    if setup["dtype"] == "int8":
        x, x_scale = packed_matmul.quantize_int8(torch.zeros(setup["M"], k, dtype=torch.bfloat16))
    else:
        x, x_scale = torch.zeros(setup["M"], k, dtype=getattr(torch, setup["dtype"])), None
    packed_matmul.packed_matmul(x, data, scale, bias, bits=setup["bits"], in_features=k, x_scale=x_scale)


def _kernel_names(*modules) -> frozenset:
    return frozenset(name for module in modules for name, value in vars(module).items()
                     if isinstance(value, triton.runtime.KernelInterface))


# The kernels each family of setups can launch: a setup none of whose kernels ``only`` can match is not run.
_FAMILIES = {"linear": _kernel_names(linear, scales), "packed": _kernel_names(packed_matmul)}


def record(target_name: str, full: bool, only: re.Pattern | None = None) -> list[Launch]:
    """Every launch the launchers make for the grid on ``target_name`` (nothing runs). With ``only`` (the
    pattern of ``collect``), setups whose family's kernels cannot match it are skipped."""

    launches: list[Launch] = []
    current = {"setup": "", "family": ""}

    def recorder(kernel, args, constexprs, options):
        if kernel.__name__ not in _FAMILIES[current["family"]]:
            raise RuntimeError(f"{current['setup']} launched {kernel.__name__}, not a kernel of its family's "
                               f"modules: add its module to compile_gate._FAMILIES")
        launches.append(Launch(kernel, args, dict(constexprs), tuple(options), current["setup"]))

    def wanted(family: str, setup: str) -> bool:
        return only is None or any(only.search(f"{name} {setup}") for name in _FAMILIES[family])

    saved = _common.LAUNCH_RECORDER
    _common.LAUNCH_RECORDER = recorder
    try:
        with configs.recording(configs.TARGETS[target_name]):
            for family, grid, runner in (("linear", _grid, _run_linear), ("packed", _packed_grid, _run_packed)):
                for setup in grid(full):
                    text = f"{family} " + " ".join(f"{key}={value}" for key, value in setup.items())
                    if wanted(family, text):
                        current.update(setup=text, family=family)
                        runner(setup)
    finally:
        _common.LAUNCH_RECORDER = saved
    return launches


@functools.cache
def _backend(target_name: str):

    return make_backend(GPUTarget("cuda", configs.TARGETS[target_name].capability, 32))


_BINDERS = {}


def _bind(launch: Launch, option, backend):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them for this backend."""

    kernel = launch.kernel
    kwargs = dict(launch.constexprs, **option.all_kwargs())
    kwargs["debug"] = kernel.debug or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    # The binder is generated code (exec of the kernel's signature); making it once per kernel and backend, as
    # JITFunction does, keeps binding off the gate's critical path.
    binder = _BINDERS.get((kernel, backend))
    if binder is None:
        binder = _BINDERS[(kernel, backend)] = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _describe(signature, constexprs, attrs) -> str:
    types = ",".join(str(value) for value in signature.values() if value != "constexpr")
    values = ",".join(f"{name[0] if isinstance(name, tuple) else name}={value}" for name, value in constexprs.items()
                      if not (isinstance(value, int) and value == 1 and not isinstance(value, bool)))
    return f"{types}|{values}|{sorted(attrs.items())}"


def _config_name(option) -> str:
    meta = "x".join(str(value) for name, value in option.kwargs.items() if name.startswith("BLOCK"))
    return f"{meta}/{option.num_warps}w/{option.num_stages}s"


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
@dataclass
class Job:
    """One compile: ``launch`` with ``option`` for ``target``, reported in ``result``."""

    target: str
    launch: Launch
    option: object
    result: Result


# Filled in the parent before the pool forks its workers: the jobs to compile.
_JOBS: list = []


def _read_ptxas_log(text: str, result: Result) -> None:
    result.registers = max((int(value) for value in _PTXAS.findall(text)), default=0)
    spills = _SPILLS.findall(text)
    result.spill_stores = max((int(stores) for stores, _ in spills), default=0)
    result.spill_loads = max((int(loads) for _, loads in spills), default=0)


def _mma_kind(ttgir: str) -> str:
    if "warp_group_dot" in ttgir:
        pendings = [int(value) for value in re.findall(r"pendings = (\d+)", ttgir)]
        return "wgmma async" if any(pendings) else "wgmma sync"
    if "tc_gen5_mma" in ttgir:
        return "tcgen05"
    if "tt.dot" in ttgir:
        return "mma" if "nvidia_mma" in ttgir else "fma"
    return ""


def _ptx_code(ptx: str) -> str:
    """The PTX that ptxas turns into machine code: without comments, source locations and the debug sections
    (which name source lines, so code reached through different lines would look different)."""
    code = []
    for line in ptx.splitlines():
        text = line.split("//", 1)[0].strip()
        if text.startswith(".section") and ".debug" in text:
            break
        if text and not text.startswith((".loc", ".file")):
            code.append(text)
    return "\n".join(code)


def _error_text(error: Exception) -> str:
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


def _compile_job(index: int) -> Result:

    job = _JOBS[index]
    result = job.result
    started = time.time()
    knobs.nvidia.dump_ptxas_log = True
    try:
        backend = _backend(job.target)
        signature, constexprs, attrs, options = _bind(job.launch, job.option, backend)
        source = triton.compiler.ASTSource(job.launch.kernel, signature, constexprs, attrs)
        log = io.StringIO()

        def listener(times, **_):
            result.stages["make_ir"] = times.ir_initialization / 1e6
            result.stages.update((stage, micros / 1e6) for stage, micros in times.lowering_stages)

        knobs.compilation.listener = listener
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=backend.target, options=options.__dict__)
        result.shared = compiled.metadata.shared
        _read_ptxas_log(log.getvalue(), result)
        result.mma = _mma_kind(compiled.asm.get("ttgir", ""))
        result.code = hashlib.sha1(_ptx_code(compiled.asm["ptx"]).encode()).hexdigest()
    except Exception as error:  # a compile error is a result of the gate, reported with the message
        result.error = _error_text(error)
    finally:
        knobs.compilation.listener = None
    result.seconds = time.time() - started
    return result


def collect(targets, every_config: bool, full: bool, only: str | None = None, timings: dict | None = None) -> list:
    """The ``Job`` list of the targets: each distinct specialization (kernel, argument types and alignment,
    constexprs, config) of each target once, the default config of each launch included (``Result.default``).
    ``only``: a regular expression a launch's "kernel setup" text must contain. ``timings`` (a dict) receives the
    seconds spent recording launches ("record") and binding them ("bind")."""
    pattern = re.compile(only) if only else None
    timings = {} if timings is None else timings
    timings.setdefault("record", 0.0)
    timings.setdefault("bind", 0.0)
    jobs = []
    for target_name in targets:
        backend = _backend(target_name)
        seen = {}
        started = time.time()
        launches = record(target_name, full, pattern)
        timings["record"] += time.time() - started
        started = time.time()
        for launch in launches:
            if pattern and not pattern.search(f"{launch.kernel.__name__} {launch.setup}"):
                continue
            for position, option in enumerate(launch.configs if every_config else launch.configs[:1]):
                signature, constexprs, attrs, options = _bind(launch, option, backend)
                kernel_name = f"{launch.kernel.fn.__module__}.{launch.kernel.__name__}"
                key = (kernel_name, repr(signature), repr(constexprs), repr(sorted(attrs.items())),
                       repr(option.all_kwargs()))
                if key in seen:
                    seen[key].setups.append(launch.setup)
                    seen[key].default |= position == 0
                    continue
                result = Result(target_name, launch.kernel.__name__, _describe(signature, constexprs, attrs),
                                _config_name(option), position == 0, [launch.setup])
                seen[key] = result
                jobs.append(Job(target_name, launch, option, result))
        timings["bind"] += time.time() - started
    # Longest first (the GEMMs, then by warps and tile size), so the pool does not end on one slow compile.
    jobs.sort(key=lambda job: (-("gemm" in job.launch.kernel.__name__ or "linear" in job.launch.kernel.__name__),
                               -job.option.num_warps, -math.prod(value for name, value in job.option.kwargs.items()
                                                                 if name.startswith("BLOCK"))))
    return jobs


def run(targets=DEFAULT_TARGETS, every_config: bool = False, full: bool = False, workers: int | None = None,
        only: str | None = None, progress=None, timings: dict | None = None):
    """Compile every job in parallel; returns the results (one per target and specialization), each also handed
    to ``progress``. ``timings`` (a dict) receives the wall seconds of recording, binding and compiling
    ("compile")."""

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile gate needs TRITON_INTERPRET unset (the interpreter replaces compilation)")
    unknown = [name for name in targets if name not in _target_names()]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {_target_names()}")
    timings = {} if timings is None else timings
    _JOBS[:] = collect(targets, every_config, full, only, timings)
    started = time.time()
    workers = workers or os.cpu_count() or 1
    # fork: the workers inherit the recorded launches (tensors and JIT functions) without pickling them.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = []
        for result in pool.map(_compile_job, range(len(_JOBS)), chunksize=1):
            results.append(result)
            if progress is not None:
                progress(result)
    timings["compile"] = time.time() - started
    return results


def _target_names():

    return list(configs.TARGETS)


def failures(results) -> list:

    return [(result, reason) for result in results
            if (reason := result.failure(configs.TARGETS[result.target].shared_memory))]


def duplicates(results) -> list:
    """Groups of two or more results of one target, kernel and config whose PTX code is the same."""

    groups = {}
    for result in results:
        if result.code:
            groups.setdefault((result.target, result.kernel, result.config, result.code), []).append(result)
    return [group for group in groups.values() if len(group) > 1]


def print_table(results, out=sys.stdout, detail: bool = False) -> None:
    """Per target and kernel: specializations, configs, worst shared memory, worst registers, spills, MMA kinds."""

    groups = {}
    for result in results:
        groups.setdefault((result.target, result.kernel, result.default), []).append(result)
    header = (f"{'target':7s} {'kernel':28s} {'cfg':7s} {'specs':>5s} {'shared KB min-max':>17s} {'limit KB':>8s} "
              f"{'over':>4s} {'regs max':>8s} {'spilling':>8s} {'spill B max':>11s} {'errors':>6s}  mma")
    print(header, file=out)
    print("-" * len(header), file=out)
    for (target, kernel, default), group in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1],
                                                                                       not item[0][2])):
        limit = configs.TARGETS[target].shared_memory
        compiled = [result for result in group if not result.error]
        shared = [result.shared for result in compiled]
        spilling = [result for result in compiled if result.spill_stores or result.spill_loads]
        kinds = sorted({result.mma for result in compiled if result.mma})
        shared_text = f"{min(shared) / 1024:.0f}-{max(shared) / 1024:.0f}" if shared else "-"
        print(f"{target:7s} {kernel:28s} {'default' if default else 'others':7s} {len(group):5d} {shared_text:>17s} "
              f"{limit / 1024:8.0f} {sum(s > limit for s in shared):4d} "
              f"{max((r.registers for r in compiled), default=0):8d} {len(spilling):8d} "
              f"{max((r.spill_stores for r in spilling), default=0):11d} {len(group) - len(compiled):6d}  "
              f"{', '.join(kinds)}", file=out)
    if detail:
        for result in results:
            print_result(result, out)


def print_timings(results, timings: dict, out=sys.stdout) -> None:
    """Where the time went: wall seconds of recording, binding and compiling, and the compile workers' seconds
    per compiler stage summed over every compile ("cubin" is ptxas)."""
    stages = {}
    for result in results:
        for stage, seconds in result.stages.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    print(f"wall: record {timings.get('record', 0):.1f} s, bind {timings.get('bind', 0):.1f} s, compile "
          f"{timings.get('compile', 0):.1f} s; worker seconds by stage: "
          + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in stages.items())
          + f"; per compile (total) {sum(result.seconds for result in results):.1f}", file=out)


def print_result(result, out=sys.stdout) -> None:
    print(f"{result.target} {result.kernel} {result.config} {'default' if result.default else 'other'} "
          f"shared={result.shared} regs={result.registers} spills={result.spill_stores}/{result.spill_loads} "
          f"{result.mma} {result.seconds:.1f}s {result.error} {result.specialization} <- {result.setups[0]}",
          file=out, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma list of sm_80, ..., or every")
    parser.add_argument("--configs", choices=["default", "all"], default="default",
                        help="compile the default config of each launch, or every autotune config")
    parser.add_argument("--grid", choices=["ci", "full"], default="ci", help="the setups the launchers run")
    parser.add_argument("--all", action="store_true", help="every target, every config, the full grid")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--only", default=None, help="regular expression on 'kernel setup' (a subset, for checks)")
    parser.add_argument("--detail", action="store_true", help="also print one line per compile as it finishes")
    args = parser.parse_args(argv)
    if args.all:
        args.targets, args.configs, args.grid = ",".join(_target_names()), "all", "full"
    if args.targets == "every":
        args.targets = ",".join(_target_names())
    # A fresh cache so that every specialization is really compiled and ptxas reports on it.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_bq_gate_")
    started = time.time()
    timings = {}
    results = run([name.strip() for name in args.targets.split(",") if name.strip()], args.configs == "all",
                  args.grid == "full", args.workers, args.only, print_result if args.detail else None, timings)
    print_table(results)
    print_timings(results, timings)
    failed = failures(results)
    failed_defaults = [(result, reason) for result, reason in failed if result.default]
    for result, reason in failed:
        print(f"{'FAIL' if result.default else 'note'} {result.target} {result.kernel} {result.config}: {reason} "
              f"{result.error} [{result.specialization}] <- {result.setups[0]}")
    repeated = duplicates(results)
    for group in repeated:
        first = group[0]
        print(f"FAIL {first.target} {first.kernel} {first.config}: {len(group)} specializations compile to the same "
              f"PTX (a launcher passes a value the kernel does not read): "
              + "; ".join(f"[{result.specialization}] <- {result.setups[0]}" for result in group))
    print(f"{len(results)} compiles in {time.time() - started:.0f} s; {len(failed_defaults)} default configs fail, "
          f"{len(failed) - len(failed_defaults)} other autotune configs do not fit or spill (pruned or skipped); "
          f"{sum(len(group) - 1 for group in repeated)} specializations repeat another's code")
    return 1 if failed_defaults or repeated else 0


if __name__ == "__main__":
    sys.exit(main())
