"""Helpers shared by the benchmark scripts: option parsing, the git sha and the CSV written beside each run."""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def choose(text: str, allowed, flag: str) -> list:
    """The comma list ``text``, each item one of ``allowed``; SystemExit naming ``flag`` and the unknown items."""
    values = [value.strip() for value in text.split(",") if value.strip()]
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        raise SystemExit(f"{flag}: unknown {unknown or 'empty list'}; choose from {list(allowed)}")
    return values


def select_shapes(text: str, shapes) -> list:
    """Keys ``(group, name)`` of ``shapes`` named by ``text``: 'all', groups or ``group/name`` items, in order."""
    if text == "all":
        return list(shapes)
    keys = []
    for item in text.split(","):
        item = item.strip()
        matches = [key for key in shapes if item in (key[0], f"{key[0]}/{key[1]}")]
        if not matches:
            names = sorted({key[0] for key in shapes} | {f"{group}/{name}" for group, name in shapes})
            raise SystemExit(f"--shapes: unknown {item!r}; choose from {names}")
        keys += [key for key in matches if key not in keys]
    return keys


def git_sha() -> str:
    """Short sha of HEAD, with ``-dirty`` when the work tree has changes; ``unknown`` outside a git checkout.
    ``TRITON_BQ_GIT_SHA`` overrides it (a copy of the tree without ``.git``, as on a lent GPU machine)."""
    if os.environ.get("TRITON_BQ_GIT_SHA"):
        return os.environ["TRITON_BQ_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_csv(rows: list[dict], out: Path, prefix: str) -> Path:
    """``out/<prefix>-<device>-<time>.csv`` with every field of every row; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    device = rows[0]["device"].replace(" ", "_").replace("/", "_")
    path = out / f"{prefix}-{device}-{stamp}.csv"
    fields = list(dict.fromkeys(field for row in rows for field in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path
