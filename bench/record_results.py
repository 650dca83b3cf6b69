"""Write one GPU session's results into bench/RESULTS.md (called by bench/gpu_session.sh at its end).

Reads the logs the session left in ``--out`` (tests.log, matmul.log, inference.log), takes the printed tables from
them and inserts a section ``### <date> — <device> — torch <v>, triton <v>, git <sha>`` right under ``## Runs``
(newest first), with the commands, the test summary and each table. Steps that did not run are named as such.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, git_sha  # noqa: E402

RESULTS_MD = ROOT / "bench" / "RESULTS.md"


def _table(log: Path, start: str) -> str | None:
    """The lines of ``log`` from the first one starting with ``start`` to the next blank line or ``wrote``."""
    if not log.exists():
        return None
    lines = log.read_text(errors="replace").splitlines()
    for index, line in enumerate(lines):
        if line.startswith(start):
            table = []
            for row in lines[index:]:
                if not row.strip() or row.startswith("wrote"):
                    break
                table.append(row)
            return "\n".join(table)
    return None


def _tail(log: Path, count: int) -> str:
    if not log.exists():
        return "(no log: the step did not run)"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def section(out: Path, commands: dict, status: dict) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    today = datetime.date.today().isoformat()
    lines = [f"### {today} — {device} — torch {torch.__version__}, triton {triton.__version__}, git {git_sha()}", "",
             "Written by `bench/gpu_session.sh` (`bench/record_results.py`); raw CSVs and logs were in its `$OUT`.", ""]
    for step, title, start in (("tests", "GPU tests (`TRITON_BQ_AUTOTUNE=0`)", None),
                               ("matmul", "Training kernels, quick table", "median ms"),
                               ("inference", "Packed inference", "median us")):
        if step not in commands:
            continue
        lines += [f"{title}: `{commands[step]}` (exit status {status.get(step, '?')})", "", "```"]
        log = out / f"{step}.log"
        table = _table(log, start) if start else None
        lines += [table if table else _tail(log, 8), "```", ""]
    return "\n".join(lines)


def insert(text: str, path: Path = RESULTS_MD) -> None:
    """Put ``text`` right under the ``## Runs`` heading (appending the heading if the file has none)."""
    content = path.read_text()
    marker = "## Runs\n"
    if marker not in content:
        content = content.rstrip("\n") + "\n\n" + marker
    head, tail = content.split(marker, 1)
    path.write_text(head + marker + "\n" + text + "\n" + tail.lstrip("\n"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="the session's output folder (logs)")
    parser.add_argument("--step", action="append", default=[], metavar="NAME=STATUS=COMMAND",
                        help="a step that ran, its exit status and its command line (repeatable)")
    args = parser.parse_args(argv)
    commands, status = {}, {}
    for item in args.step:
        name, code, command = item.split("=", 2)
        commands[name], status[name] = command, code
    insert(section(args.out, commands, status))
    print(f"recorded the session in {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
