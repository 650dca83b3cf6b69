"""Adaptive splitting (BinaryBERT): which ternary matrices to split under a size budget.

``split_candidates`` groups a ternary model's matrices into the paper's candidates (per layer Q/K together, V, O,
FFN-in, FFN-out; the word embedding; the pooler), ``measure_split_sensitivity`` measures the dev-metric gain of
keeping each candidate ternary (split) while the rest is binary, ``split_costs`` gives the extra packed bytes of
splitting each, ``choose_splits`` solves the 0-1 knapsack exactly, and ``split_ternary_to_binary(model, include=...)``
splits the chosen ones and binarizes the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from torch import nn

from triton_bq.bitpack import packed_bytes, scale_count
from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import QuantLinear
from triton_bq.recipe.tws import is_ternary_module, split_candidates, split_ternary_to_binary

__all__ = [
    "choose_splits",
    "measure_split_sensitivity",
    "split_candidates",
    "split_costs",
    "split_extra_bytes",
]


def split_extra_bytes(module: nn.Module) -> int:
    """Extra stored bytes of splitting a ternary layer instead of binarizing it.

    The second binary matrix and its scales: ``packed_bytes(rows, columns, 1) + 4 * scales``. The bias halves merge
    into one bias and both halves keep the activation quantizer they were copied from, which is stored once.
    """
    if not isinstance(module, (QuantLinear, QuantEmbedding)) or module.weight_method not in ("twn", "lat"):
        raise TypeError(f"module must be a ternary QuantLinear or QuantEmbedding, got {type(module).__name__}")
    rows, columns = module.weight.shape
    return packed_bytes(rows, columns, 1) + 4 * scale_count(rows, module.granularity)


def split_costs(model: nn.Module, candidates: Mapping[str, Sequence[str]] | None = None) -> dict[str, int]:
    """Extra packed bytes of splitting each candidate rather than binarizing it (the knapsack weights).

    Splitting a layer adds one binary matrix (``ceil(numel / 8)`` bytes), its fp32 scales (1 per tensor, or 1 per
    row) and a copy of its activation quantizer's fp32 parameters; the bias halves merge back into one bias at
    export (``triton_bq.export.size`` counts the same way).
    """
    candidates = split_candidates(model) if candidates is None else candidates
    modules = dict(model.named_modules())
    costs = {}
    for key, names in candidates.items():
        total = 0
        for name in names:
            module = modules.get(name)
            if module is None or not is_ternary_module(module):
                raise ValueError(f"candidate {key!r} names {name!r}, which is not a ternary module of this model")
            total += split_extra_bytes(module)
        costs[key] = total
    return costs


def choose_splits(
    sensitivities: Mapping[str, float],
    sizes: Mapping[str, int],
    budget: int,
    *,
    unit: int | None = None,
    max_cells: int = 50_000_000,
) -> set[str]:
    """Adaptive splitting: the candidates to split, maximizing total sensitivity under a size budget (0-1 knapsack).

    Solves ``max sum_{c in S} sensitivity[c]  s.t.  sum_{c in S} size[c] <= budget`` exactly by dynamic programming
    over capacities in units of ``g = gcd(sizes)`` (exact, since every size is a multiple of ``g``), or of ``unit``
    when given (sizes rounded up to multiples of ``unit``: the chosen set still fits ``budget`` and is optimal for
    the rounded sizes). Candidates with ``sensitivity <= 0`` are never chosen; ties keep the smaller set.

    Args:
        sensitivities: candidate -> gain (e.g. ``measure_split_sensitivity``), finite floats.
        sizes: candidate -> extra bytes of splitting it (e.g. ``split_costs``), non-negative ints; same keys.
        budget: the extra bytes allowed, a non-negative int.
        unit: optional coarser capacity unit (positive int) for very large budgets.
        max_cells: largest DP table (candidates x capacities) allowed before asking for a ``unit``.
    """
    if set(sensitivities) != set(sizes):
        raise ValueError(
            f"sensitivities and sizes must have the same keys; only in sensitivities: "
            f"{sorted(set(sensitivities) - set(sizes))}, only in sizes: {sorted(set(sizes) - set(sensitivities))}"
        )
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool):
        raise TypeError(f"budget must be an int (bytes), got {type(budget).__name__}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if unit is not None and (not isinstance(unit, (int, np.integer)) or isinstance(unit, bool) or unit < 1):
        raise ValueError(f"unit must be None or a positive int, got {unit!r}")
    for key, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"sizes[{key!r}] must be an int (bytes), got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"sizes[{key!r}] must be >= 0, got {value}")
    for key, value in sensitivities.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"sensitivities[{key!r}] must be finite, got {value!r}")
    items = [key for key in sensitivities if float(sensitivities[key]) > 0]
    free = {key for key in items if sizes[key] == 0}
    items = [key for key in items if key not in free]
    if not items:
        return free
    if unit is None:
        step = 0
        for key in items:
            step = math.gcd(step, int(sizes[key]))
        weights = [int(sizes[key]) // step for key in items]
    else:
        step = int(unit)
        weights = [-(-int(sizes[key]) // step) for key in items]
    capacity = int(budget) // step
    if len(items) * (capacity + 1) > max_cells:
        raise ValueError(
            f"the knapsack table would have {len(items)} x {capacity + 1} cells (> max_cells={max_cells}); "
            f"pass unit= (bytes per capacity step) to coarsen it"
        )
    best = np.zeros(capacity + 1, dtype=np.float64)
    take = np.zeros((len(items), capacity + 1), dtype=bool)
    for index, (key, weight) in enumerate(zip(items, weights, strict=True)):
        if weight > capacity:
            continue
        candidate = best[: capacity + 1 - weight] + float(sensitivities[key])
        better = candidate > best[weight:]
        take[index, weight:] = better
        best[weight:] = np.where(better, candidate, best[weight:])
    chosen, remaining = set(free), capacity
    for index in range(len(items) - 1, -1, -1):
        if take[index, remaining]:
            chosen.add(items[index])
            remaining -= weights[index]
    return chosen


def measure_split_sensitivity(
    model_factory: Callable[[], nn.Module],
    evaluate: Callable[[nn.Module], float],
    candidates: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """Sensitivity of each candidate: the metric gain of keeping it ternary while the rest of the model is binary.

    ``gain[c] = evaluate(split_ternary_to_binary(model_factory(), include=candidates[c]))
    - evaluate(split_ternary_to_binary(model_factory(), include=()))``: the split layers compute the ternary
    output, the others are BWN-binarized. Model-agnostic.

    Args:
        model_factory: returns a fresh ternary model each call (e.g. ``lambda: copy.deepcopy(ternary_model)``),
            ready to evaluate (eval mode for a deterministic metric).
        evaluate: the dev metric of a model (higher is better), e.g. accuracy on the dev set.
        candidates: candidate -> module names; default ``split_candidates(model_factory())``.

    Returns:
        candidate -> gain (float), in the candidates' order. ``len(candidates) + 1`` evaluations.
    """
    baseline_model = model_factory()
    if candidates is None:
        candidates = split_candidates(baseline_model)
    baseline = float(evaluate(split_ternary_to_binary(baseline_model, include=())))
    gains = {}
    for key, names in candidates.items():
        model = split_ternary_to_binary(model_factory(), include=list(names))
        gains[key] = float(evaluate(model)) - baseline
    return gains
