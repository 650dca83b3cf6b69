"""The report stage: a table of every finished stage (dev metrics, true size, steps, time, tokens/s).

``write_report`` prints it and writes ``report.json`` (``build_report``'s dictionary), ``report.md``
(``format_report``'s markdown table, with a legend and links to the plots and the packed exports) and the plots
(``train/plots.py``) under ``--output_dir``.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch
import transformers

from train.context import DONE_FILE, PARTIAL_SUFFIX, Context, write_json
from train.history import HISTORY_FILE, read_history
from train.options import MODEL_PACKAGE, default_model_path
from train.plots import CURVES_FILE, PLOTS_DIR, plot_metric_vs_size, plot_training_curves, size_plot_name
from train.stages import Stage

# The packed exports of the finished stages, when the run wrote them (never removed by the run).
EXPORTS_DIR = "export"
LEGEND = (
    "W-E-A: bits of the weights, the word embedding and the activations (32: full precision). "
    "width: the fraction of the teacher's attention heads and FFN neurons the model keeps. "
    "size MB: the true stored size in 10^6 bytes (1 bit per binary weight, 2 per ternary weight, fp32 scales, "
    "the rest in fp32), split into the encoder (the transformer layers), the word embedding and the rest "
    "(position / token-type embeddings, LayerNorms, pooler, classifier); 1-bit / 2-bit enc: the encoder's binary / "
    "ternary weights in millions (the paper compares models with the same encoder size). x smaller: the teacher's "
    "size divided by this one. train s: seconds in training steps; "
    "wall s: the whole stage, evaluations and saving included; tokens/s: training tokens (all processes) per "
    "training second."
)


def folder_bytes(root: Path) -> int:
    """The bytes of every file under ``root``."""
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def model_label(name_or_path: str) -> str:
    """How the report names the model: the offline MiniLM by its name and package, a folder under the current
    directory by its relative path, anything else (a hub name, another folder) as given."""
    path = Path(name_or_path)
    try:
        if path.resolve() == Path(default_model_path()).resolve():
            return f"all-MiniLM-L6-v2 (PyPI package {MODEL_PACKAGE.replace('_', '-')})"
    except ValueError:
        pass
    if path.is_absolute() and path.resolve().is_relative_to(Path.cwd().resolve()):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return name_or_path


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
        "size_parts": done.get("size_parts"),
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
        "model_name": model_label(args.model_name_or_path),
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
        "run_folder_bytes": folder_bytes(ctx.output_dir),
        "plots": [],
        "exports": EXPORTS_DIR if (ctx.output_dir / EXPORTS_DIR).is_dir() else None,
    }


def size_part_cells(parts: dict | None) -> list[str]:
    """The encoder / word embedding / rest MB and the encoder's 1-bit and 2-bit weights (millions) of a row."""
    if not parts:
        return [""] * 5
    encoder = parts["encoder"]
    return [f"{parts['encoder']['stored_bytes'] / 1e6:.2f}", f"{parts['word_embedding']['stored_bytes'] / 1e6:.2f}",
            f"{parts['rest']['stored_bytes'] / 1e6:.2f}", f"{encoder['binary_weights'] / 1e6:.2f}",
            f"{encoder['ternary_weights'] / 1e6:.2f}"]


def format_report(report: dict) -> str:
    """The report as a markdown table."""
    metrics = report["metrics"]
    header = ["stage", "W-E-A", "width", *metrics, "size MB", "encoder MB", "word emb. MB", "rest MB", "1-bit enc M",
              "2-bit enc M", "x smaller", "steps", "train s", "wall s", "tokens/s"]
    lines = [
        f"# {report['task']}: {report['quant']} pipeline ({report.get('model_name', report['model'])})",
        "",
        f"Dev metrics (best checkpoint of each stage, main metric {report['main_metric']}); true stored sizes; "
        f"{report['num_processes']} process(es) on {report['device']} ({report['host']}).",
        "",
        LEGEND,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in report["rows"]:
        compression = "" if row["compression"] is None else f"{row['compression']:.1f}"
        scores = [f"{row['metrics'].get(m, math.nan) * 100:.2f}" for m in metrics]
        cells = [row["stage"], row["bits"], f"{row['width']:g}", *scores, f"{row['size_mb']:.2f}",
                 *size_part_cells(row.get("size_parts")), compression, str(row["steps"]), f"{row['train_seconds']:.0f}",
                 f"{row['wall_seconds']:.0f}", f"{row['tokens_per_second']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [name for name in report["planned_stages"] if name not in {row["stage"] for row in report["rows"]}]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    if "run_folder_bytes" in report:
        lines += ["", f"The run folder holds {report['run_folder_bytes'] / 1e6:.1f} MB."]
    if report.get("exports"):
        lines += ["", f"Packed exports: [{report['exports']}/]({report['exports']}/)."]
    for title, path in report.get("plots", []):
        lines += ["", f"![{title}]({path})"]
    return "\n".join(lines) + "\n"


def write_plots(ctx: Context, report: dict) -> list[tuple[str, str]]:
    """Draw the report's plots under ``plots/``; returns ``(title, relative path)`` of each one drawn."""
    directory = ctx.output_dir / PLOTS_DIR
    directory.mkdir(exist_ok=True)
    metric = report["main_metric"]
    histories = {row["stage"]: read_history(ctx.stage_dir(row["stage"]) / HISTORY_FILE) for row in report["rows"]}
    drawn = []
    if plot_training_curves(histories, metric, directory / CURVES_FILE):
        drawn.append(("Training curves (loss and dev " + metric + " against step)", f"{PLOTS_DIR}/{CURVES_FILE}"))
    size_file = size_plot_name(metric)
    if plot_metric_vs_size(report["rows"], metric, directory / size_file):
        drawn.append((f"Dev {metric} against stored size", f"{PLOTS_DIR}/{size_file}"))
    return drawn


def write_report(ctx: Context, stages: list[Stage], wall_seconds: float) -> dict:
    """Stage 5: build the report, print it and write ``report.json`` / ``report.md`` (main process)."""
    report = build_report(ctx, stages, wall_seconds)
    if ctx.accelerator.is_main_process:
        report["plots"] = write_plots(ctx, report)
        # Measured after the plots (the report files add a few kB).
        report["run_folder_bytes"] = folder_bytes(ctx.output_dir)
        text = format_report(report)
        write_json(ctx.output_dir / "report.json", report)
        temporary = ctx.output_dir / "report.md.tmp"
        temporary.write_text(text)
        os.replace(temporary, ctx.output_dir / "report.md")
        ctx.console.write(text)
    ctx.accelerator.wait_for_everyone()
    return report
