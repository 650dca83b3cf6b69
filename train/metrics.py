"""GLUE metrics computed locally with scikit-learn and scipy (no metric is fetched from a hub).

``compute_metrics(names, predictions, references)`` returns ``{name: float}`` for the requested names:

- ``accuracy``: fraction of exact matches.
- ``f1``: binary F1 of the positive class (label 1), 0 when there is no true or predicted positive.
- ``matthews_correlation``: Matthews correlation coefficient (CoLA), 0 when it is undefined.
- ``pearson`` / ``spearman``: correlation of regression outputs (STS-B), NaN when an input is constant.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

__all__ = ["METRIC_NAMES", "compute_metrics", "is_better"]

METRIC_NAMES = ("accuracy", "f1", "matthews_correlation", "pearson", "spearman")
_CLASSIFICATION = {"accuracy", "f1", "matthews_correlation"}


def _correlation(function, predictions: np.ndarray, references: np.ndarray) -> float:
    if np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(function(predictions, references)[0])


def compute_metrics(names: Sequence[str], predictions, references) -> dict[str, float]:
    """Compute each metric in ``names`` for ``predictions`` against ``references`` (1-D, same length).

    Classification metrics take integer class ids; ``pearson``/``spearman`` take real values.
    """
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"names must be drawn from {METRIC_NAMES}, got unknown {unknown}")
    predictions = np.asarray(predictions)
    references = np.asarray(references)
    if predictions.ndim != 1 or predictions.shape != references.shape:
        raise ValueError(
            f"predictions and references must be 1-D of the same length, got shapes "
            f"{predictions.shape} and {references.shape}"
        )
    if predictions.size == 0:
        raise ValueError("predictions must not be empty, got 0 samples")
    results = {}
    for name in names:
        if name in _CLASSIFICATION:
            if name == "accuracy":
                value = accuracy_score(references, predictions)
            elif name == "f1":
                value = f1_score(references, predictions, pos_label=1, average="binary", zero_division=0)
            else:
                value = matthews_corrcoef(references, predictions)
        elif name == "pearson":
            value = _correlation(stats.pearsonr, predictions.astype(np.float64), references.astype(np.float64))
        else:
            value = _correlation(stats.spearmanr, predictions.astype(np.float64), references.astype(np.float64))
        results[name] = float(value)
    return results


def is_better(candidate: float, best: float | None) -> bool:
    """Whether ``candidate`` beats ``best`` (higher is better; NaN never wins; anything beats ``None``)."""
    if math.isnan(candidate):
        return best is None
    return best is None or math.isnan(best) or candidate > best
