"""Paired significance tests of two models on the same dev examples (pure numpy / math, no torch).

Two models scored on the same examples are compared through each example's correctness, never through two
independent accuracies: the examples both models get right (or both get wrong) say nothing about which model is
better, and treating the two accuracies as independent samples overstates the noise.

- ``mcnemar_exact``: the exact McNemar test of one pair of prediction lists. Of the discordant examples (one model
  right, the other wrong), ``b`` favour the first model and ``c`` the second; if the models were equally good each
  discordant example would fall either way with probability 1/2, so ``min(b, c)`` is a Binomial(b + c, 1/2) tail:
  ``p = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c))`` (two-sided), and ``p = 1`` without discordant
  examples.
- ``paired_bootstrap``: the difference of the two models' accuracy averaged over several training seeds, and its
  uncertainty from resampling dev examples with replacement (the seeds stay paired with the examples: one
  resample draws example indices, and every seed's correctness of those examples is kept). The two-sided p-value
  counts the resampled differences on the far side of zero (zero included), ``p = min(1, 2 * (count + 1) /
  (resamples + 1))``: the +1 counts the observed sample itself, so a p-value is never 0, and its smallest value is
  ``2 / (resamples + 1)``. The 95% interval is the percentile interval of the resampled differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SIGNIFICANCE_LEVEL = 0.05
DEFAULT_RESAMPLES = 10_000
DEFAULT_BOOTSTRAP_SEED = 0


def is_classification(values: Sequence) -> bool:
    """Whether ``values`` are class ids (ints, or floats with integral values such as ``1.0``), the case where
    correctness per example is defined; regression scores (``2.37``) are not."""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            return False
    return True


def correctness(labels: Sequence[int], predictions: Sequence[int]) -> np.ndarray:
    """A boolean array: ``predictions[i] == labels[i]`` (``ValueError`` on different lengths or non-class values)."""
    if len(labels) != len(predictions):
        raise ValueError(f"labels and predictions differ in length: {len(labels)} != {len(predictions)}")
    if not is_classification(labels) or not is_classification(predictions):
        raise ValueError("correctness needs integer class labels and predictions (a regression task has none)")
    return np.asarray(labels, dtype=np.int64) == np.asarray(predictions, dtype=np.int64)


def discordant_counts(first_correct: np.ndarray, second_correct: np.ndarray) -> tuple[int, int]:
    """``(b, c)``: the examples only the first model gets right, and those only the second gets right."""
    first = np.asarray(first_correct, dtype=bool)
    second = np.asarray(second_correct, dtype=bool)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"first_correct and second_correct must be 1-D of one length, got {first.shape} and "
                         f"{second.shape}")
    return int(np.sum(first & ~second)), int(np.sum(~first & second))


def mcnemar_exact(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value of ``b`` and ``c`` discordant examples (the binomial test of
    ``min(b, c)`` successes in ``b + c`` fair coin flips, doubled and capped at 1; 1 when ``b + c == 0``).

    Computed with exact integers (``math.comb``), so it is exact for any count a dev set has."""
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    total = int(b) + int(c)
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(int(b), int(c)) + 1))
    # Integer numerator and denominator: the division is the only rounding.
    return min(1.0, 2 * tail / 2 ** total)


def paired_bootstrap(first_correct: np.ndarray, second_correct: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_BOOTSTRAP_SEED) -> dict:
    """Paired bootstrap over dev examples of the accuracy difference ``first - second``, averaged over seeds.

    ``first_correct`` and ``second_correct`` are boolean arrays of shape ``(seeds, examples)`` (or ``(examples,)``
    for one seed): row ``s`` is each dev example's correctness of seed ``s``'s model, the same examples in the same
    order everywhere. Each example contributes ``d_i``, the mean over seeds of ``first - second`` on it; the
    observed difference is the mean of ``d_i``. A resample draws ``examples`` indices with replacement and takes the
    mean of their ``d_i``.

    ``d_i`` takes few distinct values (multiples of ``1 / seeds`` in ``[-1, 1]``), so a resample is drawn as how
    many of its indices land on each distinct value, a multinomial draw with the values' frequencies: the same
    distribution as drawing the indices one by one, at a cost independent of the dev set's size. ``seed`` fixes
    numpy's generator, so the result is reproducible.

    Returns ``difference`` (observed), ``p_value`` (two-sided, +1-corrected, see the module docstring),
    ``ci_low`` / ``ci_high`` (the 2.5th and 97.5th percentiles of the resampled differences), ``resamples``,
    ``seed`` and ``examples``.
    """
    first = np.atleast_2d(np.asarray(first_correct, dtype=bool))
    second = np.atleast_2d(np.asarray(second_correct, dtype=bool))
    if first.shape != second.shape or first.ndim != 2 or first.shape[1] == 0:
        raise ValueError(f"first_correct and second_correct must be (seeds, examples) of one non-empty shape, got "
                         f"{first.shape} and {second.shape}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    seeds, examples = first.shape
    # Integer per-example differences summed over seeds (exact), divided by the seed count only at the end.
    summed = (first.astype(np.int64) - second.astype(np.int64)).sum(axis=0)
    values, counts = np.unique(summed, return_counts=True)
    observed = float(summed.sum()) / (seeds * examples)
    generator = np.random.default_rng(seed)
    draws = generator.multinomial(examples, counts / examples, size=resamples)
    resampled = (draws @ values) / (seeds * examples)
    if observed > 0:
        beyond = int(np.sum(resampled <= 0))
    elif observed < 0:
        beyond = int(np.sum(resampled >= 0))
    else:
        beyond = resamples
    p_value = min(1.0, 2 * (beyond + 1) / (resamples + 1))
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"difference": observed, "p_value": p_value, "ci_low": float(low), "ci_high": float(high),
            "resamples": resamples, "seed": seed, "examples": examples}
