"""Run one of the offline-compile commands (``python -m triton_bq.kernels.<command>``) in a subprocess that compiles
for real: without ``TRITON_INTERPRET`` (conftest sets it for this process on CPU-only machines) and without an
inherited ``TRITON_CACHE_DIR`` (the commands make their own fresh cache, so ptxas runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_command(command: str, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", f"triton_bq.kernels.{command}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
