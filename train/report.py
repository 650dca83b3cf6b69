"""The report stage: a table of every finished stage (dev metrics, true size, steps, time, tokens/s).

``write_report`` prints it and writes ``report.json`` (``build_report``'s dictionary) and ``report.md``
(``format_report``'s markdown table) under ``--output_dir``.
"""

from __future__ import annotations

import math
import os
import platform

import torch
import transformers

from train.context import DONE_FILE, PARTIAL_SUFFIX, Context, write_json
from train.stages import Stage


def report_row(name: str, done: dict, teacher: dict | None) -> dict:
    """One stage's report row, from its ``DONE.json`` record (``teacher``: the teacher's, for the compression)."""
    ratio = teacher["size_bytes"] / done["size_bytes"] if teacher and done.get("size_bytes") else None
    return {
        "stage": name,
        "bits": done["bits"],
        "width": done.get("width", 1.0),
        "metrics": {k: v for k, v in done["metrics"].items() if k != "eval_samples"},
        "eval_samples": done["metrics"].get("eval_samples"),
        "size_mb": done["size_bytes"] / 1e6,
        "compression": ratio,
        "steps": done["steps"],
        "train_seconds": done["train_seconds"],
        "wall_seconds": done["wall_seconds"],
        "tokens_per_second": done["tokens_per_second"],
    }


def build_report(ctx: Context, stages: list[Stage], wall_seconds: float) -> dict:
    """Rows for every finished stage in ``--output_dir`` (this run's and earlier runs'), teacher first."""
    names = [stage.name for stage in stages]
    settings = ctx.fingerprint()
    others = sorted(
        path.parent.name for path in ctx.output_dir.glob(f"*/{DONE_FILE}")
        if path.parent.name not in names and not path.parent.name.endswith(PARTIAL_SUFFIX)
    )
    rows = []
    teacher = ctx.done("teacher")
    for name in names + others:
        done = ctx.done(name)
        # Stages of earlier runs count only when trained with the same settings.
        if done is not None and done["settings"] == settings:
            rows.append(report_row(name, done, teacher))
    args = ctx.args
    return {
        "task": ctx.spec.name,
        "main_metric": ctx.spec.main_metric,
        "metrics": list(ctx.spec.metrics),
        "model": args.model_name_or_path,
        "quant": args.quant,
        "act_bits": args.act_bits,
        "planned_stages": names,
        "num_processes": ctx.accelerator.num_processes,
        "device": str(ctx.accelerator.device),
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "run_wall_seconds": wall_seconds,
        "settings": ctx.fingerprint(),
        "rows": rows,
    }


def format_report(report: dict) -> str:
    """The report as a markdown table."""
    metrics = report["metrics"]
    header = ["stage", "W-E-A", "width", *metrics, "size MB", "x smaller", "steps", "train s", "wall s", "tokens/s"]
    lines = [
        f"# {report['task']}: {report['quant']} pipeline ({report['model']})",
        "",
        f"Dev metrics (best checkpoint of each stage, main metric {report['main_metric']}); true stored sizes; "
        f"{report['num_processes']} process(es) on {report['device']} ({report['host']}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in report["rows"]:
        compression = "" if row["compression"] is None else f"{row['compression']:.1f}"
        scores = [f"{row['metrics'].get(m, math.nan) * 100:.2f}" for m in metrics]
        cells = [row["stage"], row["bits"], f"{row['width']:g}", *scores,
                 f"{row['size_mb']:.2f}", compression, str(row["steps"]), f"{row['train_seconds']:.0f}",
                 f"{row['wall_seconds']:.0f}", f"{row['tokens_per_second']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [name for name in report["planned_stages"] if name not in {row["stage"] for row in report["rows"]}]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write_report(ctx: Context, stages: list[Stage], wall_seconds: float) -> dict:
    """Stage 5: build the report, print it and write ``report.json`` / ``report.md`` (main process)."""
    report = build_report(ctx, stages, wall_seconds)
    if ctx.accelerator.is_main_process:
        text = format_report(report)
        write_json(ctx.output_dir / "report.json", report)
        temporary = ctx.output_dir / "report.md.tmp"
        temporary.write_text(text)
        os.replace(temporary, ctx.output_dir / "report.md")
        print(text, flush=True)
    ctx.accelerator.wait_for_everyone()
    return report
