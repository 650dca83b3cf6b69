"""Ternary weight splitting (TWS, BinaryBERT): a ternary model becomes a binary one with the same outputs.

TWS turns a trained ternary matrix ``w`` (latent) into two binary latent matrices ``w1``, ``w2`` with
``BWN(w1) + BWN(w2) == T(w)``, where ``T`` is the ternary quantizer the model used (TWN, or LAT with its own
``alpha``/``delta``), so the binary model starts exactly where the ternary one ended. With the ternary codes ``c``
(computed exactly as the ternary forward does), ``n`` elements per scale group (the whole matrix for
``granularity="tensor"``, one row for ``"row"``) and the index sets

- ``I = {c != 0}``,  ``J = {c == 0, w >= 0}``,  ``K = {c == 0, w < 0}``

(an exact ``w == 0`` with code 0 goes to ``J``; ``K`` would give the same halves, ``w1 = b``, ``w2 = -b``):

- ``w1 = a * w`` on ``I``,  ``b + w`` on ``J``,  ``b`` on ``K``
- ``w2 = (1 - a) * w`` on ``I``,  ``-b`` on ``J``,  ``w - b`` on ``K``
- ``a = (S_I + S_K - S_J) / (2 S_I)``  with ``S_X = sum_X |w|``
- ``b = (n * alpha_t - S_all) / (2 (|J| + |K|))``

``alpha_t`` is the ternary scale. For TWN, ``alpha_t = S_I / |I|`` and ``b`` is the paper's
``((n / |I|) S_I - S_all) / (2 (|J| + |K|))``. For LAT, ``alpha_t`` is the loss-aware scale of the layer (it reads
the optimizer's second moment exactly as the forward does), so the split reproduces the LAT output, not a TWN
re-ternarization of the latent weight (which is what the BinaryBERT reference script does).

Why it is exact: ``w1 + w2 = w``; on ``I`` both halves carry the sign of ``w`` (``0 < a < 1``); on ``J`` and ``K``
``w1 > 0 > w2`` (``b > 0``). Then ``mean|w1| = mean|w2|`` is what fixes ``a``, and ``mean|w1| + mean|w2| = alpha_t``
is what fixes ``b``, so ``BWN(w1) + BWN(w2)`` is ``alpha_t * sign(w)`` on ``I`` and ``0`` on ``J`` and ``K``. The
binary scales must be computed over the same groups as the ternary ones (``granularity`` is kept).

Edge cases (per scale group): ``J`` and ``K`` empty (no ternary zero): ``b`` is not used and is set to ``0``, and
``a = 1/2`` (``w1 = w2 = w / 2``). ``I`` empty: only an all-zero group (TWN/LAT give a non-empty ``I`` otherwise)
splits, into ``w1 = w2 = 0``. Exactness needs ``0 < a < 1`` and ``b > 0``; when they fail no split with
``w1 + w2 = w`` exists (``mean|w1| + mean|w2| >= mean|w|``, so ``alpha_t <= mean|w|`` has no solution) and a
ValueError says which group fails. Gaussian-like matrices are far from that: ``|S_K - S_J|`` grows like
``sqrt(n)`` while ``S_I`` grows like ``n``, and ``alpha_t > mean|w|`` always holds for TWN when ``J`` or ``K`` is
non-empty.

Precision: ``a``, ``b``, the sums ``S_*`` and the halves are computed in float64 and rounded once to the latent
dtype (the halves' signs are checked after rounding). In float64 arithmetic the split is exact to about 1e-16.
The binary codes are always exact (``(c1 + c2) / 2 == c``), but the scales ``mean|w1|``, ``mean|w2|`` are float32
reductions (design.md, like the ternary ``alpha_t``), so ``BWN(w1) + BWN(w2)`` equals ``T(w)`` to a few float32
ulps of ``alpha_t``, not bit for bit (the zeros on ``J`` and ``K`` become residues ``+-(mean|w1| - mean|w2|)``);
``tests/test_splitting.py`` pins the bound and docs/design.md records the measured figures. A layer's output then
matches the ternary one to float32 tolerance. With activation quantization, those ulps can flip an activation
rounding downstream, exactly as any re-association of the ternary model's own float arithmetic does.

Adaptive splitting (which matrices to split under a size budget) lives in ``triton_bq.recipe.adaptive``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from triton_bq import reference
from triton_bq.arch import BERT_SPLIT_GROUPS
from triton_bq.convert import record_quantization
from triton_bq.nn.activation import second_moment_of
from triton_bq.nn.embedding import QuantEmbedding, check_plain_lookup
from triton_bq.nn.linear import BinaryLinear, QuantConv1D, QuantLinear
from triton_bq.nn.split import SplitBinaryEmbedding, SplitBinaryLinear

__all__ = [
    "SplitBinaryLinear",
    "SplitBinaryEmbedding",
    "tws_coefficients",
    "split_ternary_weight",
    "split_ternary_to_binary",
    "is_ternary_module",
    "split_candidates",
]

TERNARY_METHODS = ("twn", "lat")


def _ternary_scale_threshold(weight, granularity, method, scale, threshold, second_moment):
    if method not in TERNARY_METHODS:
        raise ValueError(f"method must be one of {TERNARY_METHODS}, got {method!r}")
    if (scale is None) != (threshold is None):
        raise ValueError("scale and threshold must be given together (or neither)")
    if scale is None:
        if method == "twn":
            return None, reference.twn_threshold(weight, granularity)
        return reference.lat_scale_threshold(weight, second_moment, granularity)
    return scale, threshold


def _tws(weight, granularity, method, scale, threshold, second_moment):
    """Float64 latent, the set ``I`` and the coefficients of TWS: ``(w, nonzero, a, b, valid, n_i, n_zero)``."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if granularity not in reference.GRANULARITIES:
        raise ValueError(f"granularity must be one of {reference.GRANULARITIES}, got {granularity!r}")
    if granularity == "row" and weight.dim() != 2:
        raise ValueError(f"granularity='row' needs a 2-D weight, got shape {tuple(weight.shape)}")
    scale, threshold = _ternary_scale_threshold(weight, granularity, method, scale, threshold, second_moment)
    dims = dict(dim=1, keepdim=True) if granularity == "row" else dict()
    group = weight.shape[1] if granularity == "row" else weight.numel()
    groups = weight.shape[0] if granularity == "row" else 1
    group_shape = (groups, 1) if granularity == "row" else ()
    for name, value in (("scale", scale), ("threshold", threshold)):
        if value is not None and value.numel() != groups:
            raise ValueError(f"{name} must have {groups} element(s) for granularity={granularity!r} and weight shape "
                             f"{tuple(weight.shape)}, got shape {tuple(value.shape)}")
    w = weight.detach().to(torch.float64)
    nonzero = reference.twn_codes(weight.detach(), threshold.reshape(group_shape).to(weight.device)) != 0
    positive_zero = ~nonzero & (weight.detach() >= 0)
    magnitude = w.abs()
    sum_all = magnitude.sum(**dims)
    sum_i = (magnitude * nonzero).sum(**dims)
    sum_j = (magnitude * positive_zero).sum(**dims)
    sum_k = (magnitude * ~(nonzero | positive_zero)).sum(**dims)
    n_i = nonzero.sum(**dims).to(torch.float64)
    n_zero = group - n_i
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    if scale is None:
        target = torch.where(n_i > 0, sum_i / n_i.clamp_min(1.0), zero)
    else:
        target = scale.detach().to(device=w.device, dtype=torch.float64).reshape(sum_i.shape)
    a = torch.where(sum_i > 0, (sum_i + sum_k - sum_j) / (2 * sum_i.clamp_min(1e-300)), torch.full_like(sum_i, 0.5))
    b = torch.where(n_zero > 0, (group * target - sum_all) / (2 * n_zero.clamp_min(1.0)), zero)
    valid_a = (n_i == 0) | ((a > 0) & (a < 1))
    valid_b = (n_zero == 0) | (b > 0) | ((sum_all == 0) & (b == 0))
    return w, nonzero, a, b, valid_a & valid_b, n_i, n_zero


def _raise_invalid(valid, a, b, n_i, n_zero, granularity):
    bad = (~valid).reshape(-1).nonzero().reshape(-1)
    first = int(bad[0])
    where = f"row {first}" if granularity == "row" else "the tensor"
    raise ValueError(
        f"ternary weight splitting has no exact solution for {bad.numel()} scale group(s); first: {where} with "
        f"a={float(a.reshape(-1)[first])!r} (needs 0 < a < 1), b={float(b.reshape(-1)[first])!r} (needs b > 0), "
        f"|I|={int(n_i.reshape(-1)[first])}, |J|+|K|={int(n_zero.reshape(-1)[first])}; b <= 0 means the ternary "
        f"scale is not above mean|w|, a outside (0, 1) means |S_K - S_J| >= S_I"
    )


def tws_coefficients(
    weight: torch.Tensor,
    granularity: str = "tensor",
    *,
    method: str = "twn",
    scale: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The TWS coefficients ``(a, b)`` in float64 (scalars, or ``[N, 1]`` for ``granularity="row"``).

    ``a = (S_I + S_K - S_J) / (2 S_I)``, ``b = (n alpha_t - S_all) / (2 (|J| + |K|))`` (module docstring), with
    ``a = 1/2`` where ``I`` is empty and ``b = 0`` where ``J`` and ``K`` are empty. No validity check.
    """
    _, _, a, b, _, _, _ = _tws(weight, granularity, method, scale, threshold, second_moment)
    return a, b


def split_ternary_weight(
    weight: torch.Tensor,
    granularity: str = "tensor",
    *,
    method: str = "twn",
    scale: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a latent ternary weight into two binary latent weights ``(w1, w2)`` with ``BWN(w1) + BWN(w2) == T(w)``.

    Args:
        weight: the latent weight (any shape for ``"tensor"``, 2-D for ``"row"``), float32 or float64 (bf16/fp16
            work but the rounding of the halves then costs about 3 decimal digits of exactness).
        granularity: ``"tensor"`` or ``"row"``: the ternary scale groups, kept by the binary halves.
        method: ``"twn"`` or ``"lat"``: the ternary quantizer ``T`` the model used.
        scale, threshold: the ternary ``(alpha, delta)`` to reproduce (both or neither). Default: TWN's
            ``delta = 0.7 mean|w|`` with ``alpha = S_I / |I|`` in float64, or LAT's
            ``reference.lat_scale_threshold(weight, second_moment, granularity)``.
        second_moment: Adam's ``exp_avg_sq`` of ``weight`` (LAT only).

    Returns:
        ``(w1, w2)`` in ``weight``'s dtype and device, computed in float64 (module docstring for the formulas and
        the edge cases). A meta ``weight`` gives meta halves (shapes only, used by ``triton_bq.size``).

    Raises:
        ValueError: when no exact split exists for some scale group, or rounding to ``weight``'s dtype flipped a sign.
    """
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        _ternary_scale_threshold(weight, granularity, method, scale, threshold, second_moment)
        return torch.empty_like(weight), torch.empty_like(weight)
    w, nonzero, a, b, valid, n_i, n_zero = _tws(weight, granularity, method, scale, threshold, second_moment)
    if not bool(valid.all()):
        _raise_invalid(valid, a, b, n_i, n_zero, granularity)
    # Off I: w1 = b + w on J (w >= 0) and b on K, i.e. b + max(w, 0); w2 = -b on J and w - b on K, i.e. min(w, 0) - b.
    w1 = torch.where(nonzero, a * w, w.clamp_min(0) + b).to(weight.dtype)
    w2 = torch.where(nonzero, (1 - a) * w, w.clamp_max(0) - b).to(weight.dtype)
    # The BWN signs are fixed by construction (w1 >= 0 off I, w2 < 0 off I where b > 0, sign(w) on I); rounding to
    # the latent dtype must not have flipped one.
    nonnegative = weight.detach() >= 0
    checked = nonzero | (b > 0)
    flipped = checked & (((w1 >= 0) != (nonnegative | ~nonzero)) | ((w2 >= 0) != (nonnegative & nonzero)))
    if bool(flipped.any()):
        raise ValueError(
            f"rounding the split halves to {weight.dtype} flipped the sign of {int(flipped.sum())} element(s); "
            f"split a float32 or float64 latent weight"
        )
    return w1, w2


def is_ternary_module(module: nn.Module) -> bool:
    """A ``QuantLinear`` (``TernaryLinear``, ternary ``QuantConv1D``) or a ``QuantEmbedding`` with a ternary
    (``"twn"``/``"lat"``) weight method."""
    return isinstance(module, (QuantLinear, QuantEmbedding)) and module.weight_method in TERNARY_METHODS


def _latent(module: nn.Module) -> torch.Tensor:
    """The latent weight in the layout its scales are grouped by (``[out, in]`` for Linear / Conv1D)."""
    return module.linear_weight() if isinstance(module, QuantLinear) else module.weight


def _ternary_weight_options(module):
    """``split_ternary_weight`` keyword arguments reproducing the ternary quantizer of ``module``."""
    if module.weight_method == "lat":
        if isinstance(module, QuantLinear):
            scale, threshold = module.weight_scale_threshold()
        else:
            scale, threshold = reference.lat_scale_threshold(module.weight, second_moment_of(module), "row")
        return dict(method="lat", scale=scale, threshold=threshold)
    return dict(method="twn")


def _split_halves(module: nn.Module, granularity: str, initialize: bool) -> tuple[nn.Parameter, nn.Parameter]:
    latent = _latent(module)
    if not initialize:
        half = latent.detach() / 2
        halves = half, half.clone()
    else:
        halves = split_ternary_weight(latent, granularity, **_ternary_weight_options(module))
    return tuple(nn.Parameter(half.contiguous(), requires_grad=module.weight.requires_grad) for half in halves)


def _split_linear(module: QuantLinear, halves: tuple[nn.Parameter, nn.Parameter]) -> SplitBinaryLinear:
    split = []
    for latent in halves:
        half = BinaryLinear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta",
            granularity=module.granularity, ste=module.ste, backend=module.backend,
        )
        half.weight = latent
        if module.bias is not None:
            half.bias = nn.Parameter(module.bias.detach() / 2, requires_grad=module.bias.requires_grad)
        half.act_quantizer = copy.deepcopy(module.act_quantizer)
        half.train(module.training)
        split.append(half)
    return SplitBinaryLinear.from_halves(*split)


def _split_embedding(module: QuantEmbedding, halves: tuple[nn.Parameter, nn.Parameter]) -> SplitBinaryEmbedding:
    split = []
    for latent in halves:
        half = QuantEmbedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta",
            weight_method="bwn", ste=module.ste,
        )
        half.weight = latent
        half.train(module.training)
        split.append(half)
    return SplitBinaryEmbedding.from_halves(*split)


def _binarize(module: nn.Module) -> nn.Module:
    """The BWN layer on the same latent Parameters (and the same activation quantizer) as a ternary layer."""
    if isinstance(module, QuantEmbedding):
        return QuantEmbedding.from_embedding(module, weight_method="bwn", ste=module.ste)
    options = dict(granularity=module.granularity, ste=module.ste, backend=module.backend)
    if isinstance(module, QuantConv1D):
        binary = QuantConv1D(module.in_features, module.out_features, bias=module.bias is not None, device="meta",
                             weight_method="bwn", **options)
        binary.weight, binary.bias = module.weight, module.bias
        binary.train(module.training)
    else:
        binary = BinaryLinear.from_linear(module, **options)
    binary.act_quantizer = module.act_quantizer
    binary.layer_name = module.layer_name
    return binary


CANDIDATE_SEPARATOR = ":"


def split_candidates(model: nn.Module) -> dict[str, list[str]]:
    """Group a ternary model's layers into the adaptive-splitting candidates of BinaryBERT.

    Per Transformer layer (module name prefix ``P``, e.g. ``bert.encoder.layer.3``): ``P:qk`` (query and key
    together), ``P:v``, ``P:o`` (attention output), ``P:ffn_in``, ``P:ffn_out``. Any other ternary layer (the word
    embedding, the pooler) is a candidate of its own, named by its module name. Values are module names, in model
    order; only ternary layers (``is_ternary_module``) appear.
    """
    candidates: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not is_ternary_module(module):
            continue
        key = name
        for pattern, suffix in BERT_SPLIT_GROUPS:
            match = pattern.match(name)
            if match and not (suffix == "ffn_out" and name.endswith(".attention.output.dense")):
                key = f"{match.group('prefix')}{CANDIDATE_SEPARATOR}{suffix}"
                break
        candidates.setdefault(key, []).append(name)
    return candidates


def split_ternary_to_binary(
    model: nn.Module, include: Iterable[str] | None = None, *, initialize: bool = True
) -> nn.Module:
    """Ternary weight splitting of a whole model, in place: the BinaryBERT initialisation from TernaryBERT.

    Every ternary layer (``is_ternary_module``: ``TernaryLinear``, ternary ``QuantEmbedding``) selected by
    ``include`` becomes a ``SplitBinaryLinear`` / ``SplitBinaryEmbedding`` computing the same output (up to float32
    rounding of the scales); the others become plain binary layers (``BinaryLinear`` / binary ``QuantEmbedding``,
    BWN of the same latent Parameter, same activation quantizer), which changes their output.

    Args:
        model: a model converted with ``triton_bq.quantize_(model, QuantConfig(weight_method="twn" or "lat"))``.
            When ``model`` is itself a ternary layer, its replacement is returned.
        include: ``None`` splits every ternary layer (full TWS). Otherwise an iterable of ternary module names
            and/or candidate names of ``split_candidates(model)`` (expanded to their modules); unknown names raise.
        initialize: ``False`` builds the split structure only, with ``w / 2`` in both halves and no TWS arithmetic
            (the float64 TWS arithmetic is the slow part on CPU): for loading a state dict saved from a split model.

    Returns:
        ``model`` (modified in place). The split layers have new Parameters: build the optimizer afterwards. LAT
        layers are split against their own loss-aware ``(alpha, delta)`` (reading the attached optimizer's second
        moment, as their forward does). The split layers are binary (BWN) from then on.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = [(name, module) for name, module in model.named_modules() if is_ternary_module(module)]
    if not targets:
        found = sorted({type(module).__name__ for module in model.modules()
                        if isinstance(module, (QuantLinear, QuantEmbedding, SplitBinaryLinear, SplitBinaryEmbedding))})
        raise ValueError(
            f"split_ternary_to_binary: {type(model).__name__} has no ternary layer (TernaryLinear, ternary "
            f"QuantConv1D or QuantEmbedding) to split; its quantized layers: {', '.join(found) or 'none'}. Quantize "
            f"it with triton_bq.quantize_(model, QuantConfig(weight_method='twn' or 'lat')) first"
        )
    names = [name for name, _ in targets]
    if include is None:
        selected = set(names)
    else:
        if isinstance(include, str):
            raise TypeError(f"include must be an iterable of names, not a string, got {include!r}")
        candidates = split_candidates(model)
        selected = set()
        for entry in include:
            if entry in names:
                selected.add(entry)
            elif entry in candidates:
                selected.update(candidates[entry])
            else:
                raise ValueError(f"include names {entry!r}, which is neither a ternary module nor a split candidate "
                                 f"of this model")
    for name, module in targets:
        if isinstance(module, QuantEmbedding):
            check_plain_lookup(module, "split" if name in selected else "binarize")
    replacement = model
    # Layers tied to one latent weight (a word embedding and the lm_head) share its split halves too.
    halves_of: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    for name, module in targets:
        if name in selected:
            granularity = "row" if isinstance(module, QuantEmbedding) else module.granularity
            key = id(module.weight)
            if key not in halves_of or halves_of[key][0].shape != _latent(module).shape or granularity != "row":
                halves_of[key] = _split_halves(module, granularity, initialize)
            split = _split_embedding if isinstance(module, QuantEmbedding) else _split_linear
            new = split(module, halves_of[key])
        else:
            new = _binarize(module)
        if name:
            model.set_submodule(name, new)
        else:
            replacement = new
    record_quantization(model)
    return replacement


