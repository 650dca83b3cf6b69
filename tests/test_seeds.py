"""The seeds report: the paired tests against hand-computed cases, the aggregation of fixture runs, the files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from train.seeds import (
    aggregate_seeds,
    comparison_pairs,
    format_seeds_report,
    parse_seeds,
    seed_dir,
    summarize_seeds,
)
from train.significance import correctness, discordant_counts, mcnemar_exact, paired_bootstrap

N = 20
LABELS = [index % 2 for index in range(N)]
# Per seed: the dev examples each final model gets wrong (all others right).
TWS_WRONG = {42: {18, 19}, 43: {17, 18, 19}, 44: {19}}
BWN_WRONG = {42: set(range(10)), 43: set(range(8)), 44: set(range(9))}


def predictions_with_errors(wrong: set[int]) -> list[int]:
    return [1 - label if index in wrong else label for index, label in enumerate(LABELS)]


def row(stage: str, bits: str, accuracy: float, size_mb: float, **extra) -> dict:
    return {"stage": stage, "bits": bits, "width": 1.0, "metrics": {"accuracy": accuracy, "f1": accuracy / 2},
            "eval_samples": N, "size_mb": size_mb, "compression": None, "steps": 10, "train_seconds": 1.0,
            "wall_seconds": 2.0, "tokens_per_second": 100.0, **extra}


def write_run(directory: Path, seed: int, with_ternary: bool = True, regression: bool = False,
              bwn_wrong: dict[int, set[int]] = BWN_WRONG) -> None:
    """One seed's run folder as the pipeline leaves it: report.json and each final stage's predictions.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tws_accuracy = 1 - len(TWS_WRONG[seed]) / N
    bwn_accuracy = 1 - len(bwn_wrong[seed]) / N
    parts = {"encoder": {"stored_bytes": 4_000_000, "binary_weights": 1, "ternary_weights": 0},
             "word_embedding": {"stored_bytes": 800_000, "binary_weights": 1, "ternary_weights": 0},
             "rest": {"stored_bytes": 200_000, "binary_weights": 0, "ternary_weights": 0}}
    rows = [row("teacher", "32-32-32", 0.95 + 0.01 * (seed - 42), 90.0),
            row("binary_a8_logits", "1-1-8", tws_accuracy, 5.0, size_parts=parts),
            row("bwn_a8_logits", "1-1-8", bwn_accuracy, 5.0, size_parts=parts)]
    # The width model is trained by the first seed and given to the others (0 steps there), as ``--seeds`` does.
    rows.insert(1, row("width", "32-32-32", 0.94, 70.0, width=0.5, steps=10 if seed == 42 else 0))
    if with_ternary:
        rows.insert(2, row("ternary_a8_logits", "2-2-8", 0.93, 9.0))
    report = {"task": "sst2", "main_metric": "accuracy", "metrics": ["accuracy", "f1"], "rows": rows}
    (directory / "report.json").write_text(json.dumps(report))
    for stage, wrong in (("binary_a8_logits", TWS_WRONG[seed]), ("bwn_a8_logits", bwn_wrong[seed])):
        (directory / stage).mkdir(exist_ok=True)
        labels, predictions = LABELS, predictions_with_errors(wrong)
        if regression:
            labels = [label + 0.5 for label in labels]
            predictions = [prediction + 0.25 for prediction in predictions]
        (directory / stage / "predictions.json").write_text(json.dumps({"labels": labels,
                                                                          "predictions": predictions}))


def write_runs(root: Path, seeds=(42, 43, 44), **options) -> dict[int, Path]:
    run_dirs = {seed: seed_dir(root, seed, seeds[0]) for seed in seeds}
    for seed, directory in run_dirs.items():
        write_run(directory, seed, with_ternary=seed != 44, **options)
    return run_dirs


# --- McNemar ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, c, expected", [
    (1, 9, 2 * (1 + 10) / 1024),      # C(10,0) + C(10,1) over 2^10, doubled
    (9, 1, 2 * (1 + 10) / 1024),      # symmetric in b and c
    (0, 5, 2 / 32),
    (10, 2, 2 * (1 + 12 + 66) / 4096),
    (3, 3, 1.0),                     # b == c: the doubled tail exceeds 1 and is capped
    (7, 7, 1.0),
    (0, 0, 1.0),                     # no discordant example: no evidence either way
], ids=["1-9", "9-1", "0-5", "10-2", "3-3", "7-7", "0-0"])
def test_mcnemar_exact_hand_computed(b, c, expected):
    assert mcnemar_exact(b, c) == expected


def test_mcnemar_exact_matches_scipy_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(3, 14), (40, 61), (120, 95), (0, 1)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


@pytest.mark.parametrize("b, c", [(-1, 3), (1.5, 2), (True, 2), (2, "3")])
def test_mcnemar_exact_rejects_bad_counts(b, c):
    with pytest.raises(ValueError, match="non-negative integer count"):
        mcnemar_exact(b, c)


def test_discordant_counts_and_correctness():
    labels = [0, 1, 1, 0, 1]
    first = correctness(labels, [0, 1, 0, 0, 0])     # right on 0, 1, 3
    second = correctness(labels, [1, 1, 1, 0, 0])    # right on 1, 2, 3
    assert first.tolist() == [True, True, False, True, False]
    assert discordant_counts(first, second) == (1, 1)   # only first: 0; only second: 2
    with pytest.raises(ValueError, match="differ in length"):
        correctness(labels, [0, 1])
    with pytest.raises(ValueError, match="regression"):
        correctness([0.5, 1.5], [0.25, 1.0])


# --- paired bootstrap -----------------------------------------------------------------------------------------

def test_bootstrap_identical_models_differ_by_nothing():
    correct = np.random.default_rng(1).random((3, 50)) < 0.7
    result = paired_bootstrap(correct, correct, resamples=500)
    assert result["difference"] == 0.0
    assert result["p_value"] == 1.0
    assert (result["ci_low"], result["ci_high"]) == (0.0, 0.0)


def test_bootstrap_always_right_against_always_wrong_has_the_smallest_p_value():
    right, wrong = np.ones((2, 30), dtype=bool), np.zeros((2, 30), dtype=bool)
    result = paired_bootstrap(right, wrong, resamples=999)
    # Every resample gives +1, none is on the far side of zero: p = 2 * (0 + 1) / (999 + 1).
    assert result["difference"] == 1.0
    assert result["p_value"] == 2 / 1000
    assert (result["ci_low"], result["ci_high"]) == (1.0, 1.0)
    reverse = paired_bootstrap(wrong, right, resamples=999)
    assert reverse["difference"] == -1.0 and reverse["p_value"] == 2 / 1000


def test_bootstrap_difference_spread_and_determinism():
    generator = np.random.default_rng(7)
    first = generator.random((3, 400)) < 0.8
    second = generator.random((3, 400)) < 0.7
    result = paired_bootstrap(first, second, resamples=4000, seed=3)
    per_example = first.astype(float).mean(axis=0) - second.astype(float).mean(axis=0)
    assert result["difference"] == pytest.approx(per_example.mean())
    # The percentile interval of a mean of 400 draws is close to the normal one, mean +- 1.96 standard errors.
    standard_error = per_example.std() / math.sqrt(400)
    assert result["ci_high"] - result["ci_low"] == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
    assert result["ci_low"] < result["difference"] < result["ci_high"]
    assert paired_bootstrap(first, second, resamples=4000, seed=3) == result
    # A small difference on few examples is not significant, a large one on many is.
    assert paired_bootstrap(first[:, :20], first[:, :20] ^ (np.arange(20) == 0), resamples=2000)["p_value"] > 0.5
    assert result["p_value"] < 0.05


def test_bootstrap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one non-empty shape"):
        paired_bootstrap(np.ones((2, 5), bool), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(np.ones(5, bool), np.ones(5, bool), resamples=0)


# --- aggregation and files ------------------------------------------------------------------------------------

def test_aggregate_seeds_means_stds_and_files(tmp_path):
    run_dirs = write_runs(tmp_path)
    summary = aggregate_seeds(run_dirs, tmp_path, resamples=2000)
    assert summary["seeds"] == [42, 43, 44]
    assert summary["run_dirs"] == {"42": ".", "43": "seed_43", "44": "seed_44"}
    stages = {entry["stage"]: entry for entry in summary["stages"]}
    assert list(stages) == ["teacher", "width", "binary_a8_logits", "bwn_a8_logits"]
    assert summary["missing"] == {"ternary_a8_logits": [44]}
    tws = stages["binary_a8_logits"]["metrics"]["accuracy"]
    assert tws["values"] == [0.9, 0.85, 0.95]
    assert tws["mean"] == pytest.approx(0.9)
    assert tws["std"] == pytest.approx(0.05)                  # sqrt((0.0025 + 0.0025) / 2)
    teacher = stages["teacher"]["metrics"]["f1"]
    assert teacher["mean"] == pytest.approx(0.48) and teacher["std"] == pytest.approx(0.005)
    assert stages["teacher"]["size_mb"] == {"mean": 90.0, "std": 0.0, "values": [90.0] * 3}
    assert stages["bwn_a8_logits"]["size_parts"]["encoder"]["stored_bytes"] == 4_000_000
    assert "size_parts" not in stages["teacher"]
    assert stages["teacher"]["shared"] is False and stages["teacher"]["seeds"] == 3
    # Trained once and given to seeds 43, 44: one model, one value, no spread.
    assert stages["width"]["shared"] is True and stages["width"]["seeds"] == 1
    assert stages["width"]["metrics"]["accuracy"] == {"mean": 0.94, "std": None, "values": [0.94]}

    (comparison,) = summary["comparisons"]
    assert (comparison["act_bits"], comparison["tws_stage"], comparison["bwn_stage"]) == (
        8, "binary_a8_logits", "bwn_a8_logits")
    per_seed = {entry["seed"]: entry for entry in comparison["per_seed"]}
    # Seed 42: only TWS right on 0..9 (b = 10), only BWN right on 18, 19 (c = 2).
    assert (per_seed[42]["b"], per_seed[42]["c"]) == (10, 2)
    assert per_seed[42]["p_value"] == 2 * (1 + 12 + 66) / 4096
    assert (per_seed[43]["b"], per_seed[43]["c"]) == (8, 3)
    assert per_seed[43]["p_value"] == 2 * (1 + 11 + 55 + 165) / 2048
    difference = comparison["accuracy_difference"]
    assert difference["values"] == pytest.approx([0.4, 0.25, 0.4])
    assert difference["mean"] == pytest.approx(0.35)
    assert difference["std"] == pytest.approx(math.sqrt(0.0075))
    assert comparison["bootstrap"]["difference"] == pytest.approx(0.35)
    assert comparison["bootstrap"]["examples"] == N
    assert comparison["significant"] is True
    assert comparison["encoder_mb"] == {"tws": 4.0, "bwn": 4.0}

    written = json.loads((tmp_path / "seeds.json").read_text())
    assert written == json.loads(json.dumps(summary))
    markdown = (tmp_path / "seeds.md").read_text()
    assert markdown == format_seeds_report(summary)
    assert "the difference is significant at the 0.05 level by the paired bootstrap" in markdown
    assert "ternary_a8_logits (missing in seed 44)" in markdown
    assert "| binary_a8_logits | 1-1-8 | 1 | 3 | 90.00 ± 5.00 |" in markdown
    assert "| width | 32-32-32 | 0.5 | 1 (shared) | 94.00 | 47.00 | 70.00 |" in markdown
    png = tmp_path / "plots" / "seeds_accuracy_vs_size.png"
    assert summary["plot"] == "plots/seeds_accuracy_vs_size.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_close_models_are_reported_as_not_significant(tmp_path):
    run_dirs = write_runs(tmp_path, bwn_wrong={42: {18}, 43: {17, 19}, 44: {19, 5}})
    summary = summarize_seeds(run_dirs, tmp_path, resamples=2000)
    (comparison,) = summary["comparisons"]
    assert comparison["significant"] is False
    assert comparison["bootstrap"]["p_value"] > 0.05
    assert "the difference is not significant at the 0.05 level" in format_seeds_report(summary)


def test_one_seed_has_no_std(tmp_path):
    summary = summarize_seeds(write_runs(tmp_path, seeds=(43,)), tmp_path, resamples=200)
    stages = {entry["stage"]: entry for entry in summary["stages"]}
    assert stages["binary_a8_logits"]["metrics"]["accuracy"] == {"mean": 0.85, "std": None, "values": [0.85]}
    assert summary["comparisons"][0]["accuracy_difference"]["std"] is None
    assert "| binary_a8_logits | 1-1-8 | 1 | 1 | 85.00 |" in format_seeds_report(summary)


def test_regression_task_skips_the_paired_test(tmp_path):
    summary = summarize_seeds(write_runs(tmp_path, regression=True), tmp_path, resamples=200)
    (comparison,) = summary["comparisons"]
    assert comparison["significant"] is None and "per_seed" not in comparison
    assert "regression" in comparison["note"]
    assert comparison["metric_difference"]["mean"] == pytest.approx(0.35)
    assert "not tested for significance" in format_seeds_report(summary)


def test_missing_predictions_and_stages_are_noted(tmp_path):
    run_dirs = write_runs(tmp_path)
    (run_dirs[43] / "bwn_a8_logits" / "predictions.json").unlink()
    (comparison,) = summarize_seeds(run_dirs, tmp_path, resamples=200)["comparisons"]
    assert "seed 43 bwn_a8_logits wrote no predictions.json" in comparison["note"]
    (run_dirs[44] / "report.json").write_text(json.dumps({**json.loads((run_dirs[44] / "report.json").read_text()),
                                                         "rows": []}))
    summary = summarize_seeds(run_dirs, tmp_path, resamples=200)
    assert summary["comparisons"][0]["seeds_lacking"] == [44]
    assert "Left out: seed 44 (did not finish both stages)." in format_seeds_report(summary)
    assert comparison_pairs(["teacher", "binary_a4_logits", "bwn_a8_logits", "bwn_a8_hidden"]) == [
        (4, "binary_a4_logits", "bwn_a4_logits"), (8, "binary_a8_logits", "bwn_a8_logits")]


def test_different_dev_labels_cannot_be_paired(tmp_path):
    run_dirs = write_runs(tmp_path)
    path = run_dirs[44] / "bwn_a8_logits" / "predictions.json"
    payload = json.loads(path.read_text())
    payload["labels"] = payload["labels"][::-1]
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="cannot be paired"):
        summarize_seeds(run_dirs, tmp_path, resamples=200)


def test_missing_report_names_the_file(tmp_path):
    run_dirs = write_runs(tmp_path)
    (run_dirs[43] / "report.json").unlink()
    with pytest.raises(ValueError, match="seed_43/report.json does not exist"):
        summarize_seeds(run_dirs, tmp_path)


# --- the --seeds option ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [("42,43,44", [42, 43, 44]), ("7", [7]), (" 1, 2 ", [1, 2]),
                                             ("3,-1", [3, -1])])
def test_parse_seeds(value, expected):
    assert parse_seeds(value) == expected


@pytest.mark.parametrize("value, reason", [("", "empty"), ("42,,43", "empty"), ("42,", "empty"),
                                           ("42,x", "'x' is not an integer"), ("4.5", "not an integer"),
                                           ("42,43,42", "42 more than once")])
def test_parse_seeds_rejects(value, reason):
    with pytest.raises(ValueError, match="--seeds") as error:
        parse_seeds(value)
    assert reason in str(error.value) and repr(value) in str(error.value)
