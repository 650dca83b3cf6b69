"""The report's figures, as PNG files under ``<output_dir>/plots/``:

- ``training_curves.png``: one panel per stage that trained, its training loss (left axis) and its dev main metric
  (right axis) against the stage's step, from the stage's ``history.jsonl``.
- ``<metric>_vs_size.png``: every finished stage's dev main metric against its true stored size (MB, log scale).

matplotlib draws them without pyplot (no display, no global state).
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

PLOTS_DIR = "plots"
CURVES_FILE = "training_curves.png"


def size_plot_name(metric: str) -> str:
    return f"{metric}_vs_size.png"


def plot_training_curves(histories: dict[str, list[dict]], metric: str, path: Path) -> bool:
    """Loss and dev ``metric`` against step, one panel per stage with a history; ``False`` when none has one."""
    stages = {name: records for name, records in histories.items() if any("loss" in record for record in records)}
    if not stages:
        return False
    columns = min(len(stages), 3)
    rows = math.ceil(len(stages) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    for index, (name, records) in enumerate(stages.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        train = [record for record in records if "loss" in record]
        axes.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", marker=".", label="loss")
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.set_ylabel("training loss", color="tab:blue")
        evals = [record for record in records if "eval" in record and metric in record["eval"]]
        if evals:
            dev = axes.twinx()
            dev.plot([r["step"] for r in evals], [r["eval"][metric] for r in evals], color="tab:orange",
                     marker="o", label=f"dev {metric}")
            dev.set_ylabel(f"dev {metric}", color="tab:orange")
    figure.savefig(path, dpi=100)
    return True


def plot_metric_vs_size(rows: list[dict], metric: str, path: Path) -> bool:
    """Each stage's dev ``metric`` against its stored size in MB; ``False`` when no row has both."""
    points = [(row["size_mb"], row["metrics"][metric], row["stage"]) for row in rows
              if row.get("size_mb") and not math.isnan(row["metrics"].get(metric, math.nan))]
    if not points:
        return False
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    axes.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue")
    for size, value, name in points:
        axes.annotate(name, (size, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("stored size (MB, log scale)")
    axes.set_ylabel(f"dev {metric}")
    axes.grid(True, alpha=0.3)
    figure.savefig(path, dpi=100)
    return True
