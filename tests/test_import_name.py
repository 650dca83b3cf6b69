"""The checkout's kernels/ folder (installed as ``triton_bq.kernels``) never shadows a top-level ``kernels``.

From the repository root the folder is importable as ``kernels``, the import name of Hugging Face's ``kernels``
distribution, which transformers imports (and, from 5.25, requires). Each check runs a fresh interpreter in the
repository root, where the shadowing happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code: str, pythonpath: Path | None = None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_installed_kernels_package_wins_over_the_folder(tmp_path):
    # A stand-in for Hugging Face's package, later on the path than the repository root (as site-packages is). Only
    # the import is checked here: transformers (imported by triton_bq) would need the real package's names.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'installed'\n")
    (tmp_path / "kernels" / "layer.py").write_text("NAME = 'installed layer'\n")
    out = run_in_root(
        "import sys, kernels, kernels.layer\n"
        "assert sys.path[0] == '', sys.path[0]\n"
        "print(kernels.MARK, kernels.layer.NAME, sep='|')",
        pythonpath=tmp_path)
    assert out == "installed|installed layer"


def test_without_an_installed_kernels_the_folder_reads_as_not_installed():
    # Every other path entry holding a kernels package (Hugging Face's, where transformers >= 5.25 pulled it in) is
    # dropped first: the checkout's folder is then the only kernels on the path.
    out = run_in_root(
        "import os, sys\n"
        "root = os.getcwd()\n"
        "sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or root) == root\n"
        "               or not os.path.isdir(os.path.join(entry, 'kernels'))]\n"
        "import kernels\n"
        "print(getattr(kernels, '__file__', None), getattr(kernels, '__version__', None), sep='|')\n"
        "print(list(kernels.__path__) == [os.path.join(root, 'kernels')])")
    # What Python makes of a folder without __init__.py: a namespace package with no file and no version.
    assert out.splitlines() == ["None|None", "True"]


def test_triton_bq_and_transformers_import_in_the_root():
    # Whatever this environment installs (transformers >= 5.25 imports Hugging Face's kernels on import), importing
    # triton_bq in the root works and the top-level kernels is never the checkout's folder file.
    out = run_in_root(
        "import triton_bq, triton_bq.kernels.linear, kernels\n"
        "print(getattr(kernels, '__file__', None))")
    assert out != str(ROOT / "kernels" / "__init__.py")
