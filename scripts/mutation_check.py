"""Mutation check: does the test suite notice one-line bugs in the code it is meant to pin?

Each mutant replaces one exact line fragment of the package (it must occur exactly once) in a scratch copy of the
working tree, then runs the test files relevant to it there. A mutant is *killed* when those tests fail, and
*survives* when they pass (a test is missing). The table this prints is recorded in ``docs/mutation.md``.

The copy is made once (``.git`` and ``.venv`` left out), imports come from it (``python -m pytest`` run inside it;
``kernels/`` is also copied to ``triton_bq/kernels`` there so ``triton_bq.kernels`` does not resolve to this
checkout through the editable install), and every mutant is reverted before the next. A baseline run of all the
selected test files with no mutant must pass first, or the table would mean nothing.

    python scripts/mutation_check.py                 # every mutant
    python scripts/mutation_check.py --mutants 1 4 7 # a subset, by number
    python scripts/mutation_check.py --list          # the mutants, without running anything
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutant(NamedTuple):
    path: str  # file relative to the repository root
    old: str  # exact fragment, present exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments (files, -k expressions)
    what: str


MUTANTS = [
    Mutant("triton_bq/convert.py", "    clip_init: float = 2.5", "    clip_init: float = 1.0",
           ("tests/test_recipe_defaults.py", "tests/test_convert.py"), "QuantConfig PACT clip init 2.5 -> 1.0"),
    Mutant("triton_bq/reference.py", "(weight.abs() <= 1)", "(weight.abs() < 1)",
           ("tests/test_boundaries.py", "tests/test_reference.py"), "reference clipped STE |w| <= 1 -> < 1"),
    Mutant("kernels/linear.py",
           "acc = tl.where(tl.abs(wt) <= 1.0, acc, 0.0)", "acc = tl.where(tl.abs(wt) < 1.0, acc, 0.0)",
           ("tests/test_boundaries.py",), "kernel clipped STE |w| <= 1 -> < 1"),
    Mutant("triton_bq/reference.py", "    iterations: int = 3,", "    iterations: int = 1,",
           ("tests/test_recipe_defaults.py", "tests/test_reference.py"), "LAT default iterations 3 -> 1"),
    Mutant("triton_bq/reference.py", "TWN_THRESHOLD_FACTOR = 0.7", "TWN_THRESHOLD_FACTOR = 0.75",
           ("tests/test_recipe_defaults.py", "tests/test_reference.py"), "TWN threshold 0.7 -> 0.75"),
    Mutant("triton_bq/reference.py", "return 2 * x.detach().float().abs().mean() / math.sqrt(qmax)",
           "return 2 * x.detach().float().abs().mean() / math.sqrt(qmax + 1)",
           ("tests/test_recipe_defaults.py", "tests/test_modules.py"), "LSQ init step / sqrt(Qp) -> / sqrt(Qp + 1)"),
    Mutant("triton_bq/reference.py", "below, above = v <= qmin, v >= qmax", "below, above = v < qmin, v > qmax",
           ("tests/test_boundaries.py", "tests/test_reference.py"), "reference LSQ saturation at Qn/Qp made strict"),
    Mutant("kernels/linear.py", "            above = v >= QMAX\n", "            above = v > QMAX\n",
           ("tests/test_boundaries.py",), "kernel LSQ saturation at Qp made strict"),
    Mutant("kernels/linear.py", "partial_ptr, tl.where(valid & below, acc, 0.0), 0,",
           "partial_ptr, tl.where(valid & below, -acc, 0.0), 0,",
           ("tests/test_kernels_linear.py", "-k", "match_reference and a8-sym and bf16"),
           "kernel lower clip gradient sign flipped"),
    Mutant("triton_bq/reference.py",
           "return torch.where(weight >= 0, one, -one)", "return torch.where(weight > 0, one, -one)",
           ("tests/test_reference.py",), "BWN sign(0) = +1 -> -1"),
    Mutant("triton_bq/reference.py",
           "torch.maximum(-low, high) / qmax, qmin, qmax", "torch.maximum(-low, high) / (qmax + 1), qmin, qmax",
           ("tests/test_recipe_defaults.py", "tests/test_reference.py"),
           "symmetric activation step max / Qp -> / (Qp + 1)"),
    Mutant("train/stages.py", "              base_lr * args.hidden_lr_multiplier),", "              base_lr),",
           ("tests/test_recipe_defaults.py",), "hidden-state stage ignores the learning-rate multiplier"),
    Mutant("train/glue.py", '"--hidden_lr_multiplier", type=float, default=2.5,',
           '"--hidden_lr_multiplier", type=float, default=2.0,',
           ("tests/test_recipe_defaults.py",), "hidden-state learning-rate multiplier 2.5 -> 2.0"),
    Mutant("train/stages.py",
           'stages.append(Stage(f"tws_a{a}", "split", f"1-1-{a}", "bwn", None, f"ternary_a{a}_logits"))',
           'stages.append(Stage(f"tws_a{a}", "split", f"1-1-{a}", "bwn", None, f"ternary_a{a}_hidden"))',
           ("tests/test_recipe_defaults.py",), "TWS starts from the ternary hidden-state stage"),
    Mutant("triton_bq/recipe/distill.py",
           "        keys = keep[:, None, None, :]", "        keys = keep[:, None, :, None]",
           ("tests/test_boundaries.py", "tests/test_distill.py"), "attention loss masks queries instead of keys"),
    Mutant("triton_bq/nn/attention.py",
           "module.scores = scores if keep is None else torch.where(keep, scores, torch.zeros_like(scores))",
           "module.scores = scores", ("tests/test_boundaries.py", "tests/test_distill.py"),
           "recorded scores keep the masked keys"),
    Mutant("triton_bq/recipe/tws.py", "(group * target - sum_all) / (2 * n_zero.clamp_min(1.0))",
           "(group * target - sum_all) / (2 * n_zero.clamp_min(1.0) + 1)",
           ("tests/test_splitting.py", "-k", "bert or exact"), "TWS b off by a denominator term"),
    Mutant("triton_bq/nn/activation.py", "        if not bool(self.initialized):", "        if True:",
           ("tests/test_recipe_defaults.py", "tests/test_modules.py"),
           "LSQ step re-initialised from the first batch after a load"),
]


def make_copy(destination: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "runs")
    shutil.copytree(ROOT, destination, ignore=ignore, symlinks=True)
    shutil.copytree(ROOT / "kernels", destination / "triton_bq" / "kernels", ignore=ignore)


def target(copy: Path, path: str) -> Path:
    """Where ``path`` is imported from in the copy (``kernels/`` lives at ``triton_bq/kernels``)."""
    return copy / "triton_bq" / path if path.startswith("kernels/") else copy / path


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    status = {0: "survived", 1: "killed"}.get(result.returncode, f"error rc={result.returncode}")
    if status.startswith("error"):
        print(result.stdout[-2000:], result.stderr[-2000:], sep="\n", file=sys.stderr)
    return status, time.monotonic() - start


def check_imports_come_from(copy: Path) -> None:
    code = "import triton_bq, triton_bq.kernels.linear as k; print(triton_bq.__file__); print(k.__file__)"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(copy))
    files = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    for file in files:
        if not Path(file).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"the copy imports {file}, not its own files: the mutants would not be tested")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, nargs="+", help="numbers of the mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run (default: 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (when it is known good)")
    args = parser.parse_args(argv)
    chosen = list(enumerate(MUTANTS, start=1))
    if args.mutants:
        unknown = sorted(set(args.mutants) - set(range(1, len(MUTANTS) + 1)))
        if unknown:
            parser.error(f"--mutants: no mutant numbered {unknown} (1..{len(MUTANTS)})")
        chosen = [(number, mutant) for number, mutant in chosen if number in args.mutants]
    if args.list:
        for number, mutant in chosen:
            print(f"{number:2d}  {mutant.path}: {mutant.what}  [{' '.join(mutant.tests)}]")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as scratch:
        copy = Path(scratch) / "repo"
        make_copy(copy)
        check_imports_come_from(copy)
        for number, mutant in chosen:
            text = target(copy, mutant.path).read_text()
            if text.count(mutant.old) != 1:
                raise SystemExit(f"mutant {number}: {mutant.old!r} occurs {text.count(mutant.old)} times in "
                                 f"{mutant.path} (the code changed: update the mutant)")
        if not args.no_baseline:
            files = sorted({test for _, mutant in chosen for test in mutant.tests if test.startswith("tests/")})
            status, seconds = run_tests(copy, tuple(files), args.timeout)
            print(f"baseline (no mutant) on {len(files)} files: {'passed' if status == 'survived' else status} "
                  f"in {seconds:.0f} s", flush=True)
            if status != "survived":
                return 2
        rows = []
        for number, mutant in chosen:
            path = target(copy, mutant.path)
            original = path.read_text()
            path.write_text(original.replace(mutant.old, mutant.new))
            try:
                status, seconds = run_tests(copy, mutant.tests, args.timeout)
            finally:
                path.write_text(original)
            rows.append((number, mutant, status, seconds))
            print(f"{number:2d} {status:9s} {seconds:5.0f} s  {mutant.path}: {mutant.what}", flush=True)
    killed = sum(status == "killed" for _, _, status, _ in rows)
    print("\n| # | file | mutant | tests run | result | seconds |\n|---|---|---|---|---|---|")
    for number, mutant, status, seconds in rows:
        what = mutant.what.replace("|", "\\|")  # a literal | would end the Markdown cell
        print(f"| {number} | `{mutant.path}` | {what} | `{' '.join(mutant.tests)}` | {status} | {seconds:.0f} |")
    print(f"\n{killed} of {len(rows)} killed")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
