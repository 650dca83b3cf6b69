"""The offline main-loop instruction count (``python -m triton_bq.kernels.instruction_count``).

The SASS parsing is checked on hand-written listings; the real count compiles a few default specializations for
sm_90 in a subprocess without ``TRITON_INTERPRET`` and checks the lean-loop target on the default paths.
"""

import math
import subprocess

import pytest
from compiled import run_command
from triton_bq.kernels import instruction_count

_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS R4, [R2] ;
.L_x_1:
        /*0020*/                   LDS R5, [R2+0x4] ;
        /*0030*/                   FSETP.GE.AND P0, PT, R5, RZ, PT ;
        /*0040*/                   FSEL R6, RZ, 1, !P0 ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR8], R24 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, R100, gdesc[UR8], R24, gsb0 ;
        /*0070*/                   NOP ;
        /*0080*/              @!P6 BRA `(.L_x_1) ;
        /*0090*/              @P1 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.L_x_2:
        /*00b0*/                   BRA `(.L_x_2);
"""


def test_main_loop_is_the_innermost_loop_with_mma():
    loop = instruction_count.main_loop(_LISTING)
    # .L_x_1 .. its branch: LDS, FSETP, FSEL, 2 HGMMA, (NOP dropped), BRA.
    assert (loop.mma, loop.other) == (2, 4)
    assert loop.per_mma == 2.0
    assert loop.mma_name == "HGMMA.64x128x16.F32.BF16"
    assert loop.opcodes == {"LDS": 1, "FSETP": 1, "FSEL": 1, "BRA": 1}


def test_listing_without_mma_loop():
    assert instruction_count.main_loop(_LISTING.replace("HGMMA", "FFMA")) is None
    assert instruction_count.main_loop("") is None


def test_rows_know_the_default_paths():
    on = instruction_count._on_default_paths
    assert on("linear compute=bf16 weight_method=bwn granularity=tensor act=sym8 path=codes wpath=codes ste=identity")
    assert on("linear compute=bf16 weight_method=bwn granularity=tensor act=none path=codes wpath=codes ste=identity")
    assert on("linear compute=bf16 weight_method=None granularity=tensor act=sym8 path=codes wpath=codes ste=identity")
    assert not on("linear compute=bf16 weight_method=twn granularity=row act=sym8 path=fused wpath=codes ste=identity")
    assert not on("linear compute=bf16 weight_method=twn granularity=row act=none path=codes wpath=fused ste=identity")
    assert not on("packed dtype=bfloat16 M=16 bits=1 parts=1")


def _run_count(*args: str) -> subprocess.CompletedProcess:
    """``python -m triton_bq.kernels.instruction_count ARGS`` compiled for real (no interpreter, a fresh cache)."""
    return run_command("instruction_count", *args)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_default_paths_meet_the_lean_loop_target_on_sm90():
    """Forward, grad-x and grad-w of BWN and TWN under bf16 autocast, weight-only and A8: at most 1.3x the non-MMA
    instructions per HGMMA of the plain bf16 dot with the same tile."""
    completed = _run_count(
        "--max-ratio", "1.3",
        "--only", r"_quant_linear_.*compute=bf16-autocast .*act=(none|sym8|asym8) path=codes wpath=codes")
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    rows = [line for line in completed.stdout.splitlines() if "HGMMA" in line]
    assert {line.split()[0] for line in rows} == {"fwd", "bwd_x", "bwd_w"}, completed.stdout


_GEMV_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   LOP3.LUT P0, RZ, R4, 0x1, RZ, 0xc0, !PT ;
        /*0030*/              @P0 FADD R6, R6, R5 ;
        /*0040*/                   NOP ;
        /*0050*/              @!P6 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
.L_x_1:
        /*0070*/                   BRA `(.L_x_1);
"""


def test_gemv_loop_is_the_innermost_loop_with_global_loads():
    """The GEMV's K loop (not the trailing self-branch), counted per weight code of a step."""
    loop = instruction_count.load_loop(_GEMV_LISTING)
    assert (loop.mma, loop.other) == (0, 4)
    assert loop.opcodes == {"LDG": 1, "LOP3": 1, "FADD": 1, "BRA": 1}
    assert instruction_count.main_loop(_GEMV_LISTING) is None
    assert instruction_count.load_loop(_LISTING) is None  # its loops hold MMAs or no global load
    row = instruction_count.GemvRow("sm_90", "packed W1", "1x64x32/4w/3s", bits=1, codes_per_step=4096,
                                    num_warps=4, loop=loop)
    # 4 instructions x 32 threads x 4 warps for 4096 codes; 8 codes per byte of 1-bit weights.
    assert row.per_code == 0.125
    assert row.per_byte == 1.0
    assert math.isnan(instruction_count.GemvRow("sm_90", "", "", 2, 1, 4).per_code)  # no loop counted


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gemv_count_command():
    """The command prints the GEMV table for the packed M = 1 launches: a finite count per code and per byte."""
    completed = _run_count("--only", r"^_packed_gemv.* M=1 bits=1 ")
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    rows = [line.split() for line in completed.stdout.splitlines() if line.startswith("gemv ")]
    assert len(rows) == 2, completed.stdout  # bf16 and int8 x
    for cells in rows:
        per_code, per_byte = float(cells[7]), float(cells[8])
        assert 0 < per_code < 100 and per_byte == pytest.approx(per_code * 8, abs=0.1), cells
