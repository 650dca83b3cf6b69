"""The offline compile gate: the launchers' own launches, compiled for sm_80 / sm_89 / sm_90 without a GPU.

``test_default_configs_compile_fit_and_do_not_spill`` runs ``python -m triton_bq.kernels.compile_gate`` (the default
config of every launch specialization of the CI grid, three targets, one worker process per core, a fresh Triton
cache) in a subprocess without ``TRITON_INTERPRET``; it fails on a compile error, shared memory over a target's
per-block limit or a register spill. The rest checks the config choice itself, cheaply, in this process.
"""

import itertools
import re

import pytest
import torch
from compiled import run_command
from triton_bq.kernels import compile_gate, configs, linear


def _operand_mixes():
    for x_bytes, weight_bytes, dot_bytes in itertools.product((2, 4), (2, 4), (2, 4)):
        for act_fused, partials, weight_fused, code_sum in itertools.product((False, True), repeat=4):
            for tf32 in (False, True) if dot_bytes == 4 else (False,):
                yield configs.LinearOperands(x_bytes, weight_bytes, dot_bytes, act_fused, partials, weight_fused,
                                             tf32, code_sum)


@pytest.mark.parametrize("target", list(configs.TARGETS.values()), ids=list(configs.TARGETS))
def test_every_target_gets_fitting_configs(target):
    """Every GEMM and operand mix keeps a non-empty config list whose shared-memory bound fits the target."""
    for kernel in configs.LINEAR_KERNELS:
        for operands in _operand_mixes():
            options = configs.linear(kernel, target, operands)
            assert options, (kernel, target, operands)
            for option in options:
                assert configs.linear_shared_bound(kernel, option, operands) <= target.shared_memory


@pytest.mark.parametrize("target", list(configs.TARGETS.values()), ids=list(configs.TARGETS))
def test_defaults_avoid_spill_prone_tiles(target):
    """Where a spill-free candidate fits, the default is one (the fused-activation forward off sm_90, the fused
    grad_w on sm_120, grad_x with partial sums): the gate found the big tiles spilling there."""
    for kernel in configs.LINEAR_KERNELS:
        for operands in _operand_mixes():
            options = configs.linear(kernel, target, operands)
            if any(not configs._spill_prone(kernel, option, operands, target) for option in options):
                assert not configs._spill_prone(kernel, options[0], operands, target), (kernel, target, operands)


def _default(kernel, target, operands):
    option = configs.linear(kernel, configs.TARGETS[target], operands)[0]
    meta = option.kwargs
    return f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}/{option.num_warps}w/{option.num_stages}s"


def test_blackwell_float32_defaults_avoid_the_allocator_spills():
    """The float32 defaults the full grid found spilling on sm_120 and sm_100 (ptxas-blackwell) move; others
    stay."""
    fused_act = configs.LinearOperands(4, 4, 4, act_fused=True, partials=False)
    fused_weight = configs.LinearOperands(4, 4, 4, act_fused=False, partials=False, weight_fused=True)
    streamed = configs.LinearOperands(4, 4, 4, act_fused=False, partials=False, weight_fused=False)
    assert _default("bwd_w", "sm_120", fused_act) == "32x64x64/4w/3s"
    assert _default("bwd_w", "sm_100", fused_act) == "32x64x64/4w/3s"
    assert _default("fwd", "sm_120", fused_weight) == "64x64x32/4w/2s"
    assert _default("fwd", "sm_120", streamed) == "64x64x32/4w/3s"
    for target in ("sm_80", "sm_89", "sm_90"):
        assert _default("bwd_w", target, fused_act) == "32x64x64/8w/3s"
        assert _default("fwd", target, fused_weight) == "64x64x32/4w/3s"


def test_asymmetric_forwards_avoid_the_code_sum_spills():
    """The forwards that sum the weight codes in the loop (asymmetric activations) and spilled in the full grid
    take a 32-deep K step (sm_100; sm_90 with float32 x quantized in the loop), 8 warps (TF32 on sm_100) or 2
    stages (IEEE float32 beside streamed activation codes on sm_80); the same forwards without the code sum keep
    their tiles."""
    for code_sum, expected in ((True, "128x128x32/8w/3s"), (False, "128x128x64/8w/3s")):
        fused = configs.LinearOperands(2, 4, 2, act_fused=True, partials=False, code_sum=code_sum)
        codes = configs.LinearOperands(2, 4, 2, act_fused=False, partials=False, code_sum=code_sum)
        fp32_x = configs.LinearOperands(4, 4, 2, act_fused=True, partials=False, code_sum=code_sum)
        tf32 = configs.LinearOperands(4, 4, 4, act_fused=False, partials=False, tf32=True, code_sum=code_sum)
        assert _default("fwd", "sm_100", fused) == expected
        assert _default("fwd", "sm_100", codes) == expected
        assert _default("fwd", "sm_90", fp32_x) == expected
        assert _default("fwd", "sm_90", fused) == "128x128x64/8w/3s"
        assert _default("fwd", "sm_100", tf32) == ("64x64x32/8w/3s" if code_sum else "64x64x32/4w/3s")
        ieee = configs.LinearOperands(4, 4, 4, act_fused=False, partials=False, code_sum=code_sum)
        assert _default("fwd", "sm_80", ieee) == ("64x64x32/4w/2s" if code_sum else "64x64x32/4w/3s")
        assert _default("fwd", "sm_89", ieee) == "64x64x32/4w/3s"


def test_launcher_flags_the_code_sum_of_asymmetric_forwards():
    """The launcher sets ``code_sum`` exactly when the forward sums the weight codes in its loop: asymmetric
    activations with the weight codes made in the loop (not streamed, not symmetric)."""
    def forward_default(setup):
        pattern = re.compile(rf"^_quant_linear_fwd_kernel linear compute=bf16 {setup} ")
        # The pattern names the kernel: record() returns every launch of the matching setups.
        launches = [launch for launch in compile_gate.record("sm_100", True, pattern)
                    if pattern.search(f"{launch.kernel.__name__} {launch.setup}")]
        assert launches, setup
        return {launch.configs[0].kwargs["BLOCK_K"] for launch in launches}

    assert forward_default("weight_method=twn granularity=row act=asym8tok path=fused wpath=fused") == {32}
    assert forward_default("weight_method=bwn granularity=tensor act=asymlsq4 path=codes wpath=fused") == {32}
    assert forward_default("weight_method=twn granularity=row act=asym8tok path=fused wpath=codes") == {64}
    assert forward_default("weight_method=twn granularity=row act=sym8tok path=fused wpath=fused") == {64}


def _specializations(pattern: str) -> dict:
    """{(kernel, setup fields): what a GPU run specializes the launch on} for the full-grid setups on sm_90 that
    ``pattern`` matches: the constexprs, the tensor arguments' dtypes and the default config."""
    recorded = {}
    for launch in compile_gate.record("sm_90", True, re.compile(pattern)):
        fields = frozenset(launch.setup.split()[1:])
        dtypes = tuple(str(arg.dtype) if isinstance(arg, torch.Tensor) else None for arg in launch.args)
        key = (tuple(sorted(launch.constexprs.items())), dtypes, tuple(sorted(launch.configs[0].all_kwargs().items())))
        recorded.setdefault((launch.kernel.__name__, fields), set()).add(key)
    return recorded


def test_launches_that_compile_alike_share_one_specialization():
    """Values a GEMM does not read are made canonical by its launcher, so the launches differ only where the code
    does (one JIT compile and one autotuning each on a GPU); the gate fails on any two specializations of the same
    PTX code."""
    recorded = _specializations(r"^_quant_linear_\w+ linear compute=bf16-autocast .*granularity=tensor "
                                r".*fdot=float ste=identity")

    def spec(kernel, **fields):
        setup = dict(compute="bf16-autocast", weight_method="bwn", granularity="tensor", act="sym8", path="codes",
                     wpath="codes", fdot="float", ste="identity")
        setup.update(fields)
        return recorded[(f"_quant_linear_{kernel}_kernel", frozenset(f"{k}={v}" for k, v in setup.items()))]

    for one, other in (("sym8", "lsq4"), ("asym8", "asymlsq4")):
        # On streamed activation codes the forward and grad_w only scale them: sym / LSQ and asym / asym_lsq alike.
        for kernel in ("fwd", "bwd_w"):
            assert spec(kernel, act=one) == spec(kernel, act=other)
            assert spec(kernel, act=one, path="fused") != spec(kernel, act=other, path="fused")
        assert spec("fwd", act=one, wpath="fused") == spec("fwd", act=other, wpath="fused")
    assert spec("fwd", act="sym8") != spec("fwd", act="asym8")  # the zero point's sum_k c term
    # grad_x tests the clip range of sym and asym alike; LSQ and asym_lsq test different ranges.
    for path in ("codes", "fused"):
        assert spec("bwd_x", act="sym8", path=path) == spec("bwd_x", act="asym8", path=path)
        assert spec("bwd_x", act="lsq4", path=path) != spec("bwd_x", act="asymlsq4", path=path)
    # Per-token asym codes reach grad_w dequantized: a plain GEMM, as without activation quantization.
    assert spec("bwd_w", act="asym8tok") == spec("bwd_w", act="none")
    # Streamed weight codes look alike for BWN and TWN (no threshold pointer); codes made in the loop do not.
    for kernel in ("fwd", "bwd_x"):
        assert spec(kernel, act="none", weight_method="twn") == spec(kernel, act="none")
        assert spec(kernel, act="none", weight_method="twn", wpath="fused") != spec(kernel, act="none", wpath="fused")


def test_launches_that_compile_alike_share_one_specialization_off_the_usual_setups():
    """The same off the CI grid: the int8 forward has no float precision, grad_x on row-scaled streamed codes is
    the plain GEMM of a layer without weight quantization, and the scale pass reads qmax for sym / asym only."""
    recorded = _specializations(r"^_(quant_linear_\w+|act_params) linear compute=(fp32|fp32-tf32|bf16) "
                                r"weight_method=(bwn|None) .*act=(sym8|lsq4|lsq4u) path=\w+ wpath=codes fdot=int8 "
                                r"ste=identity")

    def spec(kernel, **fields):
        setup = dict(compute="fp32", weight_method="bwn", granularity="tensor", act="sym8", path="codes",
                     wpath="codes", fdot="int8", ste="identity")
        setup.update(fields)
        name = "_act_params_kernel" if kernel == "act_params" else f"_quant_linear_{kernel}_kernel"
        return recorded[(name, frozenset(f"{k}={v}" for k, v in setup.items()))]

    assert spec("fwd") == spec("fwd", compute="fp32-tf32")
    assert spec("bwd_x", compute="bf16", granularity="row", path="fused") == spec(
        "bwd_x", compute="bf16", weight_method="None", path="fused")
    assert spec("bwd_x", compute="bf16", path="fused") != spec("bwd_x", compute="bf16", weight_method="None",
                                                               path="fused")
    assert spec("act_params", act="lsq4", path="fused") == spec("act_params", act="lsq4u", path="fused")


def test_duplicates_groups_one_target_kernel_and_config():
    def result(target="sm_90", config="64x64x32/4w/3s", code="a", specialization="s"):
        return compile_gate.Result(target, "kernel", specialization, config, True, code=code)

    same = [result(specialization="x"), result(specialization="y")]
    others = [result(target="sm_80"), result(config="32x32x32/4w/3s"), result(code="b"), result(code="")]
    assert compile_gate.duplicates(same + others) == [same]
    assert compile_gate.duplicates(others + [result(code="")]) == []


def test_ptx_code_leaves_out_comments_locations_and_debug_sections():
    ptx = ("//\n// Generated by LLVM NVPTX Back-End\n.target sm_90a\n.visible .entry k(\n\t.param .u64 k_param_0\n)\n"
           "{\n\t.loc\t1 12 7\n\tadd.s32 \t%r1, %r2, %r3;  // @k\n\tret;\n}\n\t.file\t1 \"linear.py\"\n"
           "\t.section\t.debug_info\n\t{\n.b8 12\n\t}\n")
    code = compile_gate._ptx_code(ptx)
    assert code == ".target sm_90a\n.visible .entry k(\n.param .u64 k_param_0\n)\n{\nadd.s32 \t%r1, %r2, %r3;\nret;\n}"
    moved = ptx.replace(".loc\t1 12 7", ".loc\t1 40 3").replace(".b8 12", ".b8 40")
    assert compile_gate._ptx_code(moved) == code
    assert compile_gate._ptx_code(ptx.replace("add.s32", "sub.s32")) != code


def test_ptxas_log_parsing():
    """The gate's register and spill figures come from ptxas -v; a spilling and a clean log (ptxas 13 wording)."""
    result = compile_gate.Result("sm_120", "kernel", "", "", True)
    compile_gate._read_ptxas_log(
        "ptxas-blackwell info    : Compiling entry function '_quant_linear_bwd_w_kernel' for 'sm_120a'\n"
        "    24 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads\n"
        "ptxas-blackwell info    : Used 128 registers, used 1 barriers, 24 bytes cumulative stack size\n", result)
    assert (result.registers, result.spill_stores, result.spill_loads) == (128, 24, 20)
    assert result.failure(101376) == "spills 24/20 B"
    clean = compile_gate.Result("sm_90", "kernel", "", "", True, shared=232449)
    compile_gate._read_ptxas_log("ptxas info    : Used 168 registers, used 1 barriers\n"
                                 "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n", clean)
    assert (clean.registers, clean.spill_stores) == (168, 0)
    assert clean.failure(232448) == "shared 232449 > 232448"


def test_interpreter_configs_are_unchanged_by_targets():
    """Under the interpreter (target None) the kernels keep their one small config, whatever the operands."""
    for kernel in configs.LINEAR_KERNELS:
        for operands in _operand_mixes():
            (option,) = configs.linear(kernel, None, operands)
            assert option.kwargs == dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP=2)


def test_slots_tile_every_grad_x_config():
    slot_m, slot_k = configs.linear_slots()
    for target in configs.TARGETS.values():
        for operands in _operand_mixes():
            for option in configs.linear("bwd_x", target, operands):
                assert option.kwargs["BLOCK_M"] % slot_m == 0 and option.kwargs["BLOCK_K"] % slot_k == 0


def test_path_and_forward_dot_context_and_setter():
    for name, setter, context, default, other in [
        ("_ACT_PATH", linear.set_act_path, linear.act_path, "codes", "fused"),
        ("_WEIGHT_PATH", linear.set_weight_path, linear.weight_path, "codes", "fused"),
        ("_FORWARD_DOT", linear.set_forward_dot, linear.forward_dot, "float", "int8"),
    ]:
        assert getattr(linear, name) == default
        with context(other):
            assert getattr(linear, name) == other
        assert getattr(linear, name) == default
        with pytest.raises(ValueError, match="bogus"):
            setter("bogus")
        assert setter(default) == default


def test_record_runs_only_the_setups_a_pattern_can_match():
    # A packed-only pattern runs no fused-linear setup; a linear pattern runs only its own setups.
    packed = compile_gate.record("sm_89", False, re.compile(r"^_packed_gemv_kernel packed dtype=int8 M=1 "))
    assert packed and all(launch.setup.startswith("packed dtype=int8 M=1 ") for launch in packed)
    assert {launch.kernel.__name__ for launch in packed} <= compile_gate._FAMILIES["packed"]
    lsq = compile_gate.record("sm_89", False, re.compile(r"^_quant_linear_fwd_kernel linear compute=bf16 .*act=lsq4 "))
    assert lsq and all(launch.setup.startswith("linear compute=bf16 ") and " act=lsq4 " in launch.setup
                       for launch in lsq)
    # Each setup records all of its launches (collect filters them by kernel afterwards).
    assert {launch.kernel.__name__ for launch in lsq} >= {"_quant_linear_fwd_kernel", "_quant_linear_bwd_x_kernel"}


def test_recording_target_is_scoped():
    cpu = torch.device("cpu")
    assert configs.target_of(cpu) is None
    with configs.recording(configs.TARGETS["sm_89"]):
        assert configs.target_of(cpu).shared_memory == 101376
    assert configs.target_of(cpu) is None
    with pytest.raises(TypeError, match="str"):
        with configs.recording("sm_89"):
            pass


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_default_configs_compile_fit_and_do_not_spill():
    completed = run_command("compile_gate", "--targets", "sm_80,sm_89,sm_90")
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    assert "0 default configs fail" in completed.stdout
    assert "0 specializations repeat another's code" in completed.stdout
