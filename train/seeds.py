"""The pipeline over several training seeds: every stage's dev metrics as mean and std over seeds, and a paired
test of the TWS binary model against the BWN baseline on the same dev examples.

Layout: the first seed's run is ``<output_dir>`` itself, every other seed ``s`` runs in ``<output_dir>/seed_<s>/``
(``seed_dir``). Each run folder holds the run's ``report.json`` (``train/report.py``) and, per finished stage,
``<stage>/predictions.json`` = ``{"labels": [...], "predictions": [...]}`` in dev-set order.

``aggregate_seeds`` reads every run and writes, under ``<output_dir>``:

- ``seeds.json``: the summary (``summarize_seeds``'s dictionary);
- ``seeds.md``: ``format_seeds_report``'s markdown, with the significance of each comparison stated in words;
- ``plots/seeds_<metric>_vs_size.png``: each stage's mean main metric against its stored size, error bars one
  sample standard deviation over seeds.

Statistics (``train/significance.py`` has the tests themselves):

- Per stage and metric: the mean over seeds and the sample standard deviation (``ddof=1``; ``None`` with one
  seed). A stage missing from some seed's report is listed with the seeds that lack it, not averaged.
- Per activation bit-width ``A`` with both ``binary_a{A}_logits`` (the TWS path's final model) and
  ``bwn_a{A}_logits`` (the BWN baseline's final model): each seed's dev accuracy of both from their predictions,
  the difference TWS - BWN (mean and std over seeds), each seed's exact McNemar test, and one paired bootstrap over
  dev examples of the mean-over-seeds accuracy difference (p-value and 95% interval). The pooled bootstrap decides
  "significant at 0.05": it uses every seed at once, where each McNemar test sees one seed. A regression task
  (scores, not classes) has no per-example correctness: its comparison reports the main metric's difference and
  skips the paired tests, saying so.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from train.plots import PLOTS_DIR
from train.significance import (
    DEFAULT_BOOTSTRAP_SEED,
    DEFAULT_RESAMPLES,
    SIGNIFICANCE_LEVEL,
    correctness,
    discordant_counts,
    is_classification,
    mcnemar_exact,
    paired_bootstrap,
)

REPORT_FILE = "report.json"
PREDICTIONS_FILE = "predictions.json"
SEEDS_JSON = "seeds.json"
SEEDS_MARKDOWN = "seeds.md"
TWS_FINAL = re.compile(r"binary_a(\d+)_logits")


def seed_dir(output_dir: Path, seed: int, first_seed: int) -> Path:
    """The run folder of ``seed``: ``output_dir`` for the first seed, ``output_dir/seed_<seed>`` for the others."""
    return Path(output_dir) if seed == first_seed else Path(output_dir) / f"seed_{seed}"


def seeds_plot_name(metric: str) -> str:
    return f"seeds_{metric}_vs_size.png"


def parse_seeds(value: str) -> list[int]:
    """The ``--seeds`` option: comma-separated distinct integers (``"42,43,44"``), at least one, in the given order.

    ``ValueError`` naming ``--seeds`` and the value on an empty list, an empty item, a non-integer or a repeat."""
    if not isinstance(value, str):
        raise ValueError(f"--seeds must be comma-separated integers such as 42,43,44, got {value!r}")
    items = [item.strip() for item in value.split(",")]
    if not value.strip() or any(not item for item in items):
        raise ValueError(f"--seeds must be comma-separated integers such as 42,43,44 without empty items, "
                         f"got {value!r}")
    seeds = []
    for item in items:
        try:
            seeds.append(int(item))
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers such as 42,43,44, got {value!r} "
                             f"({item!r} is not an integer)") from None
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise ValueError(f"--seeds must not repeat a seed, got {value!r} "
                         f"({', '.join(map(str, repeated))} more than once)")
    return seeds


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "values"}``: the mean and the sample standard deviation (``ddof=1``, ``None`` for one
    value) of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    # Equal values (a size, a shared stage) give exactly their value and 0, not a rounding residue.
    equal = bool(np.all(array == array[0]))
    std = None if array.size == 1 else 0.0 if equal else float(array.std(ddof=1))
    return {"mean": float(array[0] if equal else array.mean()), "std": std, "values": [float(v) for v in values]}


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: the seed's run did not finish") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_predictions(run_dir: Path, stage: str) -> dict | None:
    """A stage's ``predictions.json`` (``None`` when the run has none), checked for one label per prediction."""
    path = Path(run_dir) / stage / PREDICTIONS_FILE
    if not path.is_file():
        return None
    payload = read_json(path)
    if not isinstance(payload, dict) or not {"labels", "predictions"} <= payload.keys():
        raise ValueError(f"{path} must hold {{'labels': [...], 'predictions': [...]}}")
    if len(payload["labels"]) != len(payload["predictions"]) or not payload["labels"]:
        raise ValueError(f"{path} must hold as many labels as predictions (at least one), got "
                         f"{len(payload['labels'])} labels and {len(payload['predictions'])} predictions")
    return payload


def aggregate_stages(reports: dict[int, dict]) -> tuple[list[dict], dict[str, list[int]]]:
    """Rows of the stages present in every seed's report (in the first report's order) with each metric's and
    ``size_mb``'s mean and std over seeds, and ``{stage: seeds that lack it}`` for the others."""
    seeds = list(reports)
    rows_by_seed = {seed: {row["stage"]: row for row in report["rows"]} for seed, report in reports.items()}
    order: list[str] = []
    for seed in seeds:
        order += [row["stage"] for row in reports[seed]["rows"] if row["stage"] not in order]
    metrics = reports[seeds[0]]["metrics"]
    rows, missing = [], {}
    for stage in order:
        lacking = [seed for seed in seeds if stage not in rows_by_seed[seed]]
        if lacking:
            missing[stage] = lacking
            continue
        stage_rows = [rows_by_seed[seed][stage] for seed in seeds]
        first = stage_rows[0]
        # A stage trained by the first seed only and given to the others (the teacher and width model of
        # ``--seeds``: 0 steps there) is one model: one value, no spread over seeds.
        shared = len(seeds) > 1 and first.get("steps", 0) > 0 and all(r.get("steps") == 0 for r in stage_rows[1:])
        counted = stage_rows[:1] if shared else stage_rows
        row = {
            "stage": stage,
            "bits": first["bits"],
            "width": first.get("width", 1.0),
            "seeds": len(counted),
            "shared": shared,
            "metrics": {m: mean_std([r["metrics"].get(m, math.nan) for r in counted]) for m in metrics},
            "size_mb": mean_std([r["size_mb"] for r in counted]),
            "eval_samples": first.get("eval_samples"),
        }
        if all("size_parts" in r for r in stage_rows):
            # The first seed's parts stand for all: the architecture fixes them up to a few bytes (a split
            # layer stores one activation quantizer for both halves only while their values agree).
            row["size_parts"] = first["size_parts"]
        rows.append(row)
    return rows, missing


def comparison_pairs(stages: list[str]) -> list[tuple[int, str, str]]:
    """``(A, "binary_a{A}_logits", "bwn_a{A}_logits")`` for every activation bit-width ``A`` that has either."""
    widths = set()
    for stage in stages:
        match = TWS_FINAL.fullmatch(stage) or re.fullmatch(r"bwn_a(\d+)_logits", stage)
        if match:
            widths.add(int(match.group(1)))
    return [(a, f"binary_a{a}_logits", f"bwn_a{a}_logits") for a in sorted(widths)]


def compare_pair(run_dirs: dict[int, Path], reports: dict[int, dict], act_bits: int, tws_stage: str,
                 bwn_stage: str, resamples: int = DEFAULT_RESAMPLES,
                 bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED) -> dict:
    """TWS (``tws_stage``) against BWN (``bwn_stage``) over the seeds whose reports have both stages.

    Returns the main metric's difference over seeds (``metric_difference``) and, for a classification task whose
    seeds all wrote predictions, each seed's accuracies, discordant counts ``b`` (only TWS right) and ``c`` (only
    BWN right) and McNemar p-value, the accuracy difference's mean and std over seeds, the pooled paired bootstrap
    and ``significant`` (its p-value below 0.05). Without a paired test, ``note`` says why and ``significant`` is
    ``None``. ``ValueError`` when two runs' dev labels differ (the examples are then not paired)."""
    main_metric = reports[next(iter(reports))]["main_metric"]
    result: dict = {"act_bits": act_bits, "tws_stage": tws_stage, "bwn_stage": bwn_stage, "seeds": [],
                    "metric": main_metric, "significant": None, "note": None}
    rows = {seed: {row["stage"]: row for row in report["rows"]} for seed, report in reports.items()}
    both = [seed for seed in reports if tws_stage in rows[seed] and bwn_stage in rows[seed]]
    if not both:
        absent = [name for name in (tws_stage, bwn_stage) if all(name not in rows[s] for s in reports)]
        result["note"] = f"no seed finished both stages ({', '.join(absent) or 'each seed lacks one'} missing)"
        return result
    result["seeds"] = both
    result["seeds_lacking"] = [seed for seed in reports if seed not in both]
    result["metric_difference"] = mean_std(
        [rows[s][tws_stage]["metrics"].get(main_metric, math.nan)
         - rows[s][bwn_stage]["metrics"].get(main_metric, math.nan) for s in both])
    result["size_mb"] = {"tws": rows[both[0]][tws_stage]["size_mb"], "bwn": rows[both[0]][bwn_stage]["size_mb"]}
    for key, stage in (("tws", tws_stage), ("bwn", bwn_stage)):
        parts = rows[both[0]][stage].get("size_parts")
        if parts and "encoder" in parts:
            result.setdefault("encoder_mb", {})[key] = parts["encoder"]["stored_bytes"] / 1e6
    predictions = {seed: {stage: read_predictions(run_dirs[seed], stage) for stage in (tws_stage, bwn_stage)}
                   for seed in both}
    lacking = [f"seed {seed} {stage}" for seed in both for stage, p in predictions[seed].items() if p is None]
    if lacking:
        result["note"] = f"no paired test: {', '.join(lacking)} wrote no {PREDICTIONS_FILE}"
        return result
    reference_seed = both[0]
    reference = predictions[reference_seed][tws_stage]["labels"]
    for seed in both:
        for stage in (tws_stage, bwn_stage):
            if predictions[seed][stage]["labels"] != reference:
                raise ValueError(
                    f"{Path(run_dirs[seed]) / stage / PREDICTIONS_FILE} has other dev labels than "
                    f"{Path(run_dirs[reference_seed]) / tws_stage / PREDICTIONS_FILE}: the dev examples differ "
                    f"(order or content), so they cannot be paired")
    if not is_classification(reference) or not all(
            is_classification(predictions[s][stage]["predictions"]) for s in both for stage in (tws_stage, bwn_stage)):
        result["note"] = ("no paired test: a regression task (score predictions) has no per-example correctness; "
                          f"the {main_metric} difference is reported instead")
        return result
    tws_correct = np.stack([correctness(reference, predictions[s][tws_stage]["predictions"]) for s in both])
    bwn_correct = np.stack([correctness(reference, predictions[s][bwn_stage]["predictions"]) for s in both])
    per_seed = []
    for index, seed in enumerate(both):
        b, c = discordant_counts(tws_correct[index], bwn_correct[index])
        per_seed.append({"seed": seed, "tws_accuracy": float(tws_correct[index].mean()),
                         "bwn_accuracy": float(bwn_correct[index].mean()), "b": b, "c": c,
                         "p_value": mcnemar_exact(b, c)})
    result["examples"] = len(reference)
    result["per_seed"] = per_seed
    result["tws_accuracy"] = mean_std([entry["tws_accuracy"] for entry in per_seed])
    result["bwn_accuracy"] = mean_std([entry["bwn_accuracy"] for entry in per_seed])
    result["accuracy_difference"] = mean_std([e["tws_accuracy"] - e["bwn_accuracy"] for e in per_seed])
    result["bootstrap"] = paired_bootstrap(tws_correct, bwn_correct, resamples=resamples, seed=bootstrap_seed)
    result["significant"] = result["bootstrap"]["p_value"] < SIGNIFICANCE_LEVEL
    return result


def summarize_seeds(run_dirs: dict[int, Path], output_dir: Path, resamples: int = DEFAULT_RESAMPLES,
                    bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED) -> dict:
    """The summary of the seeds' runs (``run_dirs``: seed -> run folder, first seed first), without writing it."""
    if not run_dirs:
        raise ValueError("run_dirs must name at least one seed's run folder, got none")
    reports = {seed: read_json(Path(directory) / REPORT_FILE) for seed, directory in run_dirs.items()}
    first = reports[next(iter(reports))]
    rows, missing = aggregate_stages(reports)
    present = [name for report in reports.values() for name in (row["stage"] for row in report["rows"])]
    comparisons = [compare_pair(run_dirs, reports, a, tws, bwn, resamples, bootstrap_seed)
                   for a, tws, bwn in comparison_pairs(list(dict.fromkeys(present)))]

    def relative(path: Path) -> str:
        path, root = Path(path).resolve(), Path(output_dir).resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    return {
        "task": first["task"],
        "main_metric": first["main_metric"],
        "metrics": list(first["metrics"]),
        "seeds": list(run_dirs),
        "run_dirs": {str(seed): relative(directory) for seed, directory in run_dirs.items()},
        "significance_level": SIGNIFICANCE_LEVEL,
        "stages": rows,
        "missing": {stage: seeds for stage, seeds in missing.items()},
        "comparisons": comparisons,
        "plot": None,
    }


def plot_seeds_vs_size(rows: list[dict], metric: str, path: Path) -> bool:
    """Each stage's mean dev ``metric`` against its stored size (MB, log scale), error bars one standard deviation
    over seeds, TWS finals and BWN finals in their own colours; ``False`` when no row has both numbers."""
    points = [row for row in rows if row["size_mb"]["mean"] > 0 and metric in row["metrics"]
              and not math.isnan(row["metrics"][metric]["mean"])]
    if not points:
        return False
    figure = Figure(figsize=(7.2, 5.2), layout="constrained")
    axes = figure.add_subplot()
    # Other stages first and lighter, so the final models are drawn on top of them.
    groups = {"other stages": ("tab:blue", 0.5), "BWN baseline (final)": ("tab:green", 1.0),
              "TWS binary (final)": ("tab:red", 1.0)}
    for label, (colour, alpha) in groups.items():
        chosen = [row for row in points if group_of(row["stage"]) == label]
        if not chosen:
            continue
        axes.errorbar([row["size_mb"]["mean"] for row in chosen], [row["metrics"][metric]["mean"] for row in chosen],
                      yerr=[row["metrics"][metric]["std"] or 0.0 for row in chosen], fmt="o", capsize=3,
                      color=colour, alpha=alpha, label=label)
    sizes = sorted({row["size_mb"]["mean"] for row in points})
    heights = label_heights(points, metric)
    for row, label_y in zip(points, heights, strict=True):
        x, y = row["size_mb"]["mean"], row["metrics"][metric]["mean"]
        # Right of the point, unless a larger model sits close to the right: then left of it.
        larger = [size for size in sizes if size > x * LABEL_NEAR]
        left = bool(larger) and larger[0] < x * 1.8
        axes.annotate(row["stage"], (x, y), xytext=(x / LABEL_NEAR if left else x * LABEL_NEAR, label_y), fontsize=7,
                      va="center", ha="right" if left else "left",
                      arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.5) if label_y != y else None)
    axes.set_xscale("log")
    low, high = axes.get_ylim()
    axes.set_ylim(low, max(high, max(heights) + 0.02 * (high - low)))
    axes.set_xlabel("stored size (MB, log scale)")
    seeds = max(row["seeds"] for row in points)
    shared = " (shared stages: one run)" if any(row.get("shared") for row in points) else ""
    axes.set_ylabel(f"dev {metric}, mean ± std over {seeds} seed{'s' if seeds != 1 else ''}{shared}")
    left, right = axes.get_xlim()
    axes.set_xlim(left / 2.2, right * 1.6)   # room for the labels beside the smallest and the largest model
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=100)
    return True


# Stored sizes within this factor share a label column in the seeds plot; labels sit this factor beside a point.
LABEL_NEAR = 1.12


def label_heights(points: list[dict], metric: str, spacing: float = 0.035) -> list[float]:
    """A label height per point: its own value, pushed up just enough that labels of points at nearly the same
    size (within ``LABEL_NEAR``) stay ``spacing`` of the value range apart."""
    values = [row["metrics"][metric]["mean"] for row in points]
    gap = spacing * ((max(values) - min(values)) or 1.0)
    heights = list(values)
    order = sorted(range(len(points)), key=lambda index: (values[index], index))
    placed: list[int] = []
    for index in order:
        size = points[index]["size_mb"]["mean"]
        near = [other for other in placed
                if abs(math.log(points[other]["size_mb"]["mean"] / size)) < math.log(LABEL_NEAR)]
        if near:
            heights[index] = max(heights[index], max(heights[other] for other in near) + gap)
        placed.append(index)
    return heights


def group_of(stage: str) -> str:
    if TWS_FINAL.fullmatch(stage):
        return "TWS binary (final)"
    if re.fullmatch(r"bwn_a\d+_logits", stage):
        return "BWN baseline (final)"
    return "other stages"


def percent(entry: dict, digits: int = 2) -> str:
    """``mean ± std`` in percent (``mean`` alone with one seed)."""
    if entry["mean"] is None or math.isnan(entry["mean"]):
        return "n/a"
    text = f"{entry['mean'] * 100:.{digits}f}"
    return text if entry["std"] is None else f"{text} ± {entry['std'] * 100:.{digits}f}"


def signed_points(entry: dict) -> str:
    """A difference in percentage points with its sign, ``± std`` when there are several seeds."""
    text = f"{entry['mean'] * 100:+.2f}"
    return text if entry["std"] is None else f"{text} ± {entry['std'] * 100:.2f}"


def significance_sentence(comparison: dict, level: float) -> str:
    """The comparison's conclusion in plain words."""
    tws, bwn, a = comparison["tws_stage"], comparison["bwn_stage"], comparison["act_bits"]
    if comparison.get("bootstrap") is None:
        return f"A{a}: {tws} vs {bwn}: not tested for significance ({comparison['note']})."
    boot = comparison["bootstrap"]
    seeds = len(comparison["seeds"])
    better = "TWS" if boot["difference"] > 0 else "BWN" if boot["difference"] < 0 else "neither model"
    verdict = "is significant" if comparison["significant"] else "is not significant"
    return (f"A{a}: TWS ({tws}) minus BWN ({bwn}) dev accuracy is {signed_points(comparison['accuracy_difference'])} "
            f"points (mean ± std over {seeds} seed{'s' if seeds != 1 else ''}); the difference {verdict} at the "
            f"{level:g} level by the paired bootstrap over the {boot['examples']} dev examples (p = "
            f"{boot['p_value']:.4g}, 95% interval [{boot['ci_low'] * 100:+.2f}, {boot['ci_high'] * 100:+.2f}] "
            f"points, {boot['resamples']} resamples), {better} ahead.")


METHOD = (
    "Method: each stage's numbers are the mean ± sample standard deviation over seeds (one seed: the mean alone). "
    "A stage marked shared (the teacher and the width model) was trained once, with the first seed, and given to "
    "the other seeds: its one value is shown. TWS and BWN are compared on the same dev examples through each "
    "example's correctness. Per seed, the exact "
    "McNemar test takes the examples only one model gets right (b: only TWS, c: only BWN) and asks how likely so "
    "lopsided a split is if each such example were a fair coin flip (two-sided binomial test). Pooled over seeds, "
    "the paired bootstrap resamples dev examples with replacement (keeping every seed's result on each drawn "
    "example) and recomputes the mean-over-seeds accuracy difference; its p-value is twice the share of resamples "
    "on the far side of zero, counting the observed sample once ((count + 1) / (resamples + 1)), and the 95% "
    "interval is the middle 95% of the resampled differences. The bootstrap decides significance because it uses "
    "all seeds; the McNemar tests show whether single seeds agree."
)


def format_seeds_report(summary: dict) -> str:
    """The summary as markdown: the stage table (mean ± std over seeds), each TWS vs BWN comparison with its
    per-seed McNemar tests and the sentence saying whether the difference is significant, and the plot."""
    metrics = summary["metrics"]
    seeds = summary["seeds"]
    level = summary["significance_level"]
    lines = [
        f"# {summary['task']}: the pipeline over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({', '.join(map(str, seeds))})",
        "",
        "Run folders (relative to this one): "
        + ", ".join(f"seed {seed} in `{summary['run_dirs'][str(seed)]}`" for seed in seeds) + ".",
        "",
        METHOD,
        "",
        f"## Stages (dev metrics in percent, main metric {summary['main_metric']})",
        "",
    ]
    header = ["stage", "W-E-A", "width", "seeds", *metrics, "size MB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["stages"]:
        size = row["size_mb"]
        size_text = f"{size['mean']:.2f}" if not size["std"] else f"{size['mean']:.2f} ± {size['std']:.2f}"
        seeds_text = f"{row['seeds']} (shared)" if row.get("shared") else str(row["seeds"])
        cells = [row["stage"], row["bits"], f"{row['width']:g}", seeds_text,
                 *[percent(row["metrics"][m]) for m in metrics], size_text]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["missing"]:
        lines += ["", "Not in every seed (not averaged): " + "; ".join(
            f"{stage} (missing in seed {', '.join(map(str, lacking))})"
            for stage, lacking in summary["missing"].items()) + "."]
    lines += ["", "## TWS vs BWN (paired, on the same dev examples)", ""]
    if not summary["comparisons"]:
        lines.append("No binary_a*_logits or bwn_a*_logits stage finished: nothing to compare.")
    for comparison in summary["comparisons"]:
        lines += [f"### A{comparison['act_bits']}: {comparison['tws_stage']} vs {comparison['bwn_stage']}", ""]
        if "size_mb" in comparison:
            sizes = comparison["size_mb"]
            text = f"Stored size: TWS {sizes['tws']:.2f} MB, BWN {sizes['bwn']:.2f} MB"
            if len(comparison.get("encoder_mb", {})) == 2:
                text += (f" (encoder {comparison['encoder_mb']['tws']:.2f} MB and "
                         f"{comparison['encoder_mb']['bwn']:.2f} MB)")
            lines += [text + ".", ""]
        if "metric_difference" in comparison:
            seeds_used = ", ".join(map(str, comparison["seeds"]))
            lines += [f"Reported dev {comparison['metric']} difference TWS - BWN: "
                      f"{signed_points(comparison['metric_difference'])} points over seeds {seeds_used}.", ""]
        if comparison.get("seeds_lacking"):
            lines += [f"Left out: seed {', '.join(map(str, comparison['seeds_lacking']))} (did not finish both "
                      "stages).", ""]
        if comparison.get("per_seed"):
            lines += ["| seed | TWS accuracy | BWN accuracy | difference | b (only TWS right) | c (only BWN right) "
                      "| McNemar p |", "|---|---|---|---|---|---|---|"]
            for entry in comparison["per_seed"]:
                lines.append(
                    f"| {entry['seed']} | {entry['tws_accuracy'] * 100:.2f} | {entry['bwn_accuracy'] * 100:.2f} | "
                    f"{(entry['tws_accuracy'] - entry['bwn_accuracy']) * 100:+.2f} | {entry['b']} | {entry['c']} | "
                    f"{entry['p_value']:.4g} |")
            below = sum(entry["p_value"] < level for entry in comparison["per_seed"])
            lines += ["", f"McNemar: {below} of {len(comparison['per_seed'])} seeds significant at {level:g} "
                          "on their own.", ""]
        lines += [significance_sentence(comparison, level), ""]
    if summary.get("plot"):
        lines += [f"![Dev {summary['main_metric']} against stored size, mean ± std over seeds]({summary['plot']})",
                  ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def aggregate_seeds(run_dirs: dict[int, Path], output_dir: Path, resamples: int = DEFAULT_RESAMPLES,
                    bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED) -> dict:
    """Summarize the seeds' runs and write ``seeds.json``, ``seeds.md`` and the plot under ``output_dir``;
    returns the summary (``run_dirs``: seed -> run folder, first seed first, each holding ``report.json``)."""
    output_dir = Path(output_dir)
    summary = summarize_seeds(run_dirs, output_dir, resamples, bootstrap_seed)
    plots = output_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    name = seeds_plot_name(summary["main_metric"])
    if plot_seeds_vs_size(summary["stages"], summary["main_metric"], plots / name):
        summary["plot"] = f"{PLOTS_DIR}/{name}"
    write_text_atomic(output_dir / SEEDS_JSON, json.dumps(summary, indent=2) + "\n")
    write_text_atomic(output_dir / SEEDS_MARKDOWN, format_seeds_report(summary))
    return summary
