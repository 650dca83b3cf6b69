"""Pure-PyTorch reference quantizers: the single source of truth for the Triton kernels.

Every formula here is written out in ``docs/design.md``. The Triton kernels in ``triton_bq.kernels``
implement the same arithmetic (same rounding, same sign(0), same clamps) and a parity test pins each
pair. These functions are differentiable: gradients follow the straight-through estimators of the
BinaryBERT / TernaryBERT reference code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from triton_bq.options import (
    ACT_GRANULARITIES,
    ACT_METHODS,
    GRANULARITIES,
    LSQ_METHODS,
    STES,
    WEIGHT_METHODS,
    QuantOptions,
    check_act_bits,
    check_choice,
)

__all__ = [
    "WEIGHT_METHODS",
    "ACT_METHODS",
    "ACT_GRANULARITIES",
    "GRANULARITIES",
    "STES",
    "mean_abs",
    "bwn_codes",
    "bwn_scale",
    "twn_threshold",
    "twn_codes",
    "twn_scale",
    "lat_scale_threshold",
    "weight_scale_threshold",
    "weight_codes",
    "quantize_weight",
    "act_qrange",
    "act_params",
    "fake_quant_affine",
    "quantize_act",
    "lsq_init_step",
    "lsq_grad_scale",
    "sync_world_size",
    "all_reduce_min_max",
    "quant_linear",
]


TWN_THRESHOLD_FACTOR = 0.7
LAT_EPS = 1e-8


def _reduce_dims(weight: torch.Tensor, granularity: str):
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "row":
        if weight.dim() != 2:
            raise ValueError(f"granularity='row' needs a 2-D weight, got shape {tuple(weight.shape)}")
        return dict(dim=1, keepdim=True)
    return dict()




def mean_abs(weight: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """``mean(|w|)`` in float32: a scalar for ``"tensor"``, shape ``[N, 1]`` for ``"row"``."""
    return weight.detach().float().abs().mean(**_reduce_dims(weight, granularity))


def bwn_codes(weight: torch.Tensor) -> torch.Tensor:
    """Binary codes ``+1 if w >= 0 else -1`` (sign(0) = +1), in the weight's dtype."""
    one = torch.ones((), dtype=weight.dtype, device=weight.device)
    return torch.where(weight >= 0, one, -one)


def bwn_scale(weight: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """BWN scale ``alpha = mean(|w|)`` (float32)."""
    return mean_abs(weight, granularity)


def twn_threshold(weight: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """TWN threshold ``delta = 0.7 * mean(|w|)`` (float32)."""
    return TWN_THRESHOLD_FACTOR * mean_abs(weight, granularity)


def twn_codes(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Ternary codes ``1[w > delta] - 1[w < -delta]`` in the weight's dtype (comparison in float32)."""
    w, delta = weight.detach().float(), threshold.float()
    return ((w > delta).to(weight.dtype) - (w < -delta).to(weight.dtype)).to(weight.dtype)


def twn_scale(weight: torch.Tensor, threshold: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """TWN scale: mean of ``|w|`` over ``|w| > delta`` (float32); 0 where no element passes.

    A non-finite threshold (a NaN or inf weight in the row or tensor) gives a NaN scale, so the layer's output is
    NaN rather than silently zero (no element passes a NaN or infinite threshold).
    """
    dims = _reduce_dims(weight, granularity)
    magnitude = weight.detach().float().abs()
    threshold = threshold.float()
    mask = magnitude > threshold
    total = torch.where(mask, magnitude, torch.zeros_like(magnitude)).sum(**dims)
    count = mask.sum(**dims).to(torch.float32)
    scale = torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))
    return torch.where(torch.isfinite(threshold), scale, torch.full_like(scale, math.nan))


def lat_scale_threshold(
    weight: torch.Tensor,
    second_moment: torch.Tensor | None,
    granularity: str = "tensor",
    iterations: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss-aware ternarization (TernaryBERT): returns ``(alpha, delta)`` with ``delta = alpha / 2``.

    ``D = sqrt(v) + 1e-8`` where ``v`` is Adam's ``exp_avg_sq`` of this weight (``None`` means ``D = 1``).
    Starting from the TWN codes, alternate ``alpha = ||c * D * w||_1 / ||c * D||_1`` and
    ``c = ternary(w, alpha / 2)`` for ``iterations`` rounds.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    dims = _reduce_dims(weight, granularity)
    w = weight.detach().float()
    if second_moment is None:
        d = torch.ones_like(w)
    else:
        if second_moment.shape != weight.shape:
            raise ValueError(
                f"second_moment shape {tuple(second_moment.shape)} does not match weight shape {tuple(weight.shape)}"
            )
        d = second_moment.detach().float().sqrt() + LAT_EPS
    codes = twn_codes(w, twn_threshold(w, granularity))
    alpha = twn_scale(w, twn_threshold(w, granularity), granularity)
    for _ in range(iterations):
        numerator = (codes * d * w).abs().sum(**dims)
        denominator = (codes * d).abs().sum(**dims)
        alpha = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))
        codes = twn_codes(w, alpha / 2)
    return alpha, alpha / 2


def weight_scale_threshold(
    weight: torch.Tensor,
    method: str,
    granularity: str = "tensor",
    second_moment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(alpha, delta)`` for ``method`` in ``bwn`` (delta is ``None``), ``twn`` or ``lat``."""
    check_choice("weight_method", method, WEIGHT_METHODS)
    if method == "bwn":
        return bwn_scale(weight, granularity), None
    if method == "twn":
        delta = twn_threshold(weight, granularity)
        return twn_scale(weight, delta, granularity), delta
    return lat_scale_threshold(weight, second_moment, granularity)


def weight_codes(weight: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Codes in {-1, +1} (``threshold is None``: BWN) or {-1, 0, +1} (TWN/LAT threshold given)."""
    return bwn_codes(weight) if threshold is None else twn_codes(weight, threshold)


class _WeightQuantSTE(torch.autograd.Function):
    """``w_q = alpha * codes(w)``; backward is the straight-through estimator (identity or |w| <= 1)."""

    @staticmethod
    def forward(ctx, weight, scale, threshold, clipped):
        codes = weight_codes(weight, threshold)
        ctx.clipped = clipped
        if clipped:
            ctx.save_for_backward(weight)
        return (scale * codes.float()).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_weight = grad_output
        if ctx.clipped:
            (weight,) = ctx.saved_tensors
            grad_weight = grad_output * (weight.abs() <= 1).to(grad_output.dtype)
        return grad_weight, None, None, None


def quantize_weight(
    weight: torch.Tensor,
    method: str = "bwn",
    granularity: str = "tensor",
    ste: str = "identity",
    scale: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize a latent weight: ``alpha * codes(w)`` with a straight-through gradient.

    ``scale``/``threshold`` override the computed ``alpha``/``delta`` (both or neither for twn/lat).
    """
    check_choice("weight_method", method, WEIGHT_METHODS)
    check_choice("ste", ste, STES)
    if (scale is None) != (threshold is None) and method != "bwn":
        raise ValueError("scale and threshold must be given together for twn/lat")
    if scale is None:
        scale, threshold = weight_scale_threshold(weight, method, granularity, second_moment)
    elif method == "bwn":
        threshold = None
    return _WeightQuantSTE.apply(weight, scale, threshold, ste == "clipped")




def act_qrange(method: str, bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of an activation quantizer."""
    check_choice("act_method", method, ACT_METHODS)
    check_act_bits(bits)
    if method == "sym":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    if method in ("asym", "asym_lsq") or not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def sync_world_size(sync: bool) -> int:
    """The number of data-parallel ranks an ``act_sync`` op spans: the default process group's size when ``sync``
    is set and ``torch.distributed`` is initialized, else 1."""
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def all_reduce_min_max(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global ``(min, max)`` over the default process group: one all-reduce (MAX) of ``[-low, high]``."""
    pair = torch.stack([-low.reshape(()), high.reshape(())]).float()
    torch.distributed.all_reduce(pair, op=torch.distributed.ReduceOp.MAX)
    return -pair[0], pair[1]


def act_params(
    x: torch.Tensor,
    method: str,
    bits: int,
    clip: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    signed: bool = True,
    granularity: str = "per_tensor",
    sync: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """``(lo, hi, zero, step, qmin, qmax)`` of the affine fake-quant (float32, detached).

    ``lo`` / ``hi`` are scalars. ``zero`` / ``step`` are scalars for ``granularity="per_tensor"`` and LSQ, and of
    shape ``x.shape[:-1] + (1,)`` (one per row of ``x``) for ``"per_token"`` sym / asym (``"asym_lsq"``: ``zero``
    per row, the learned ``step`` a scalar). ``sync`` (per-tensor sym / asym / asym_lsq under an initialized
    ``torch.distributed``) takes the min / max over every rank's ``x``.
    NaN in ``x`` propagates: the scale (or zero point) of its tensor (or row) is NaN, and so is that output.
    """
    check_choice("act_granularity", granularity, ACT_GRANULARITIES)
    qmin, qmax = act_qrange(method, bits, signed)
    if method in LSQ_METHODS:
        if step is None:
            raise ValueError(f"act_method={method!r} needs act_step (the learned step size)")
        s = step.detach().float().reshape(())
        inf = torch.full((), math.inf, device=x.device)
        zero = torch.zeros((), device=x.device)
        if method == "asym_lsq" and x.numel() > 0:
            zero = _asym_lsq_zero(x, granularity, sync)
        return -inf, inf, zero, s, qmin, qmax
    if clip is None or clip.numel() != 2:
        raise ValueError(f"act_method={method!r} needs act_clip of 2 elements (lo, hi), got {clip!r}")
    lo, hi = clip.detach().float().reshape(2).unbind()
    zero = torch.zeros((), device=x.device)
    if x.numel() == 0:
        # An empty batch has no range: step 0 (the fake-quant then returns an empty tensor).
        return lo, hi, zero, zero.clone(), qmin, qmax
    clamped = torch.minimum(torch.maximum(x.detach().float(), lo), hi)
    if granularity == "per_token":
        low, high = clamped.amin(dim=-1, keepdim=True), clamped.amax(dim=-1, keepdim=True)
        if method == "asym":
            # A row's range includes 0 (as torch.ao's observers do): exact zeros, such as the masked attention
            # probabilities of a causal model, then neither move the range nor lose their value.
            low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
    else:
        low, high = clamped.amin(), clamped.amax()
        if sync_world_size(sync) > 1:
            low, high = all_reduce_min_max(low, high)
    if method == "sym":
        return lo, hi, torch.zeros_like(high), torch.maximum(-low, high) / qmax, qmin, qmax
    return lo, hi, low, (high - low) / qmax, qmin, qmax


def _asym_lsq_zero(x: torch.Tensor, granularity: str, sync: bool) -> torch.Tensor:
    """The zero point of ``asym_lsq``: BinaryBERT's ``input.min()`` (detached: no gradient flows through it), per
    tensor (the global min under ``sync``) or ``min(row min, 0)`` per row of the last dim."""
    xf = x.detach().float()
    if granularity == "per_token":
        # As per-token asym: a row's range includes 0, so the exact zeros of a causal model's masked probabilities
        # (present in a full sequence's rows, absent from its prefix's last row) cannot move the zero point.
        low = xf.amin(dim=-1, keepdim=True)
        return torch.minimum(low, torch.zeros_like(low))
    low = xf.amin()
    if sync_world_size(sync) > 1:
        low, _ = all_reduce_min_max(low, low)
    return low


def fake_quant_affine(x, lo, hi, zero, step, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round((clamp(x, lo, hi) - zero) / safe_step), qmin, qmax) * step + zero`` in float32.

    No autograd rules here: see ``quantize_act`` for the straight-through backward.
    """
    xc = torch.minimum(torch.maximum(x.float(), lo), hi)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round((xc - zero) / safe), qmin, qmax)
    return q * step + zero


class _ActQuantClip(torch.autograd.Function):
    """Uniform fake-quant with a learnable clip pair; PACT gradient for the clip."""

    @staticmethod
    def forward(ctx, x, clip, method, bits, granularity, sync):
        lo, hi, zero, step, qmin, qmax = act_params(x, method, bits, clip=clip, granularity=granularity, sync=sync)
        ctx.save_for_backward(x, clip)
        return fake_quant_affine(x, lo, hi, zero, step, qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, clip = ctx.saved_tensors
        lo, hi = clip.detach().float().reshape(2).unbind()
        xf = x.float()
        below, above = xf <= lo, xf >= hi
        grad_x = grad_output * (~below & ~above).to(grad_output.dtype)
        grad_clip = None
        if ctx.needs_input_grad[1]:
            g = grad_output.float()
            # Masked sums, not boolean indexing: no nonzero() (a host sync on CUDA) and no gathered copies.
            zero = torch.zeros((), dtype=g.dtype, device=g.device)
            grad_clip = torch.stack([torch.where(below, g, zero).sum(), torch.where(above, g, zero).sum()])
            grad_clip = grad_clip.to(clip.dtype).reshape(clip.shape)
        return grad_x, grad_clip, None, None, None, None


def lsq_grad_scale(numel: int, qmax: int, sync: bool = False) -> float:
    """LSQ's step-gradient scale ``1 / sqrt(numel * qmax)`` (0 for an empty input); ``numel`` counts the global
    batch under ``sync``: the local count times ``sync_world_size(sync)`` (equal shards per rank, as DDP assumes)."""
    total = numel * sync_world_size(sync)
    return 1.0 / math.sqrt(total * qmax) if total > 0 else 0.0


class _ActQuantLSQ(torch.autograd.Function):
    """LSQ fake-quant (Esser et al.): learned step with gradient scale ``1 / sqrt(numel * qmax)``."""

    @staticmethod
    def forward(ctx, x, step, bits, signed, sync):
        lo, hi, zero, s, qmin, qmax = act_params(x, "lsq", bits, step=step, signed=signed)
        ctx.save_for_backward(x, step)
        ctx.qrange = (qmin, qmax)
        ctx.sync = sync
        return fake_quant_affine(x, lo, hi, zero, s, qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, step = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = x.float() / step.detach().float().reshape(())
        below, above = v <= qmin, v >= qmax
        grad_x = grad_output * (~below & ~above).to(grad_output.dtype)
        grad_step = None
        if ctx.needs_input_grad[1]:
            local = torch.where(below, float(qmin), torch.where(above, float(qmax), torch.round(v) - v))
            scale = lsq_grad_scale(x.numel(), qmax, ctx.sync)
            grad_step = ((grad_output.float() * local).sum() * scale).to(step.dtype).reshape(step.shape)
        return grad_x, grad_step, None, None, None


class _ActQuantAsymLSQ(torch.autograd.Function):
    """BinaryBERT's asymmetric LSQ (``AsymLsqQuantizer``): ``x_hat = clamp(round((x - min) / s), 0, qmax) * s + min``
    with the min detached. Out-of-range tests are strict (``v < 0``, ``v > qmax`` with ``v = (x - min) / s``), as
    in BinaryBERT's code: the minimum itself (``v = 0``) passes its gradient to ``x``."""

    @staticmethod
    def forward(ctx, x, step, bits, granularity, sync):
        lo, hi, zero, s, qmin, qmax = act_params(x, "asym_lsq", bits, step=step, granularity=granularity, sync=sync)
        ctx.save_for_backward(x, step, zero)
        ctx.qrange = (qmin, qmax)
        ctx.sync = sync
        return fake_quant_affine(x, lo, hi, zero, s, qmin, qmax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, step, zero = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = (x.float() - zero) / step.detach().float().reshape(())
        small, big = v < qmin, v > qmax
        grad_x = grad_output * (~small & ~big).to(grad_output.dtype)
        grad_step = None
        if ctx.needs_input_grad[1]:
            local = torch.where(small, float(qmin), torch.where(big, float(qmax), torch.round(v) - v))
            scale = lsq_grad_scale(x.numel(), qmax, ctx.sync)
            grad_step = ((grad_output.float() * local).sum() * scale).to(step.dtype).reshape(step.shape)
        return grad_x, grad_step, None, None, None


def quantize_act(
    x: torch.Tensor,
    method: str,
    bits: int = 8,
    clip: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    signed: bool = True,
    granularity: str = "per_tensor",
    sync: bool = False,
) -> torch.Tensor:
    """Activation fake-quant with straight-through gradients (see docs/design.md).

    ``method``: ``"sym"`` (max-abs after clipping to the learnable ``clip = [lo, hi]``), ``"asym"`` (min-max
    after clipping), ``"lsq"`` (learned ``step``; ``signed=False`` for non-negative inputs) or ``"asym_lsq"``
    (BinaryBERT's asymmetric LSQ: learned ``step``, zero point the detached min of ``x``). ``granularity``: one
    dynamic scale (or asym_lsq zero point) ``"per_tensor"`` or ``"per_token"`` (per row of the last dim; the LSQ
    step is learned, so plain LSQ ignores it). ``sync``: data-parallel statistics (``act_params``,
    ``lsq_grad_scale``).
    """
    check_choice("act_method", method, ACT_METHODS)
    check_act_bits(bits)
    check_choice("act_granularity", granularity, ACT_GRANULARITIES)
    if method in LSQ_METHODS:
        if step is None:
            raise ValueError(f"act_method={method!r} needs act_step (the learned step size)")
        if method == "asym_lsq":
            return _ActQuantAsymLSQ.apply(x, step, bits, granularity, bool(sync))
        return _ActQuantLSQ.apply(x, step, bits, bool(signed), bool(sync))
    if clip is None or clip.numel() != 2:
        raise ValueError(f"act_method={method!r} needs act_clip of 2 elements (lo, hi), got {clip!r}")
    return _ActQuantClip.apply(x, clip, method, bits, granularity, bool(sync))


def lsq_init_step(x: torch.Tensor, bits: int, signed: bool = True, method: str = "lsq") -> torch.Tensor:
    """LSQ step initialisation (float32 scalar), BinaryBERT's ``LsqStepSize.initialize_wrapper``:
    ``2 * mean(|x|) / sqrt(qmax)`` for ``"lsq"``, ``4 * mean(|x|) / sqrt(2^bits - 1)`` for ``"asym_lsq"`` (``|x|``
    of the raw input, before the min shift). ``x`` must not be empty."""
    check_choice("method", method, LSQ_METHODS)
    if x.numel() == 0:
        raise ValueError(f"the LSQ step cannot be initialised from an empty tensor (shape {tuple(x.shape)})")
    _, qmax = act_qrange(method, bits, signed)
    factor = 4 if method == "asym_lsq" else 2
    return factor * x.detach().float().abs().mean() / math.sqrt(qmax)




def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    options: QuantOptions,
    *,
    weight_scale: torch.Tensor | None = None,
    weight_threshold: torch.Tensor | None = None,
    act_clip: torch.Tensor | None = None,
    act_step: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``F.linear(Q_act(x), Q_w(weight), bias)``: materializes both fake-quantized operands."""
    if options.act_method is not None:
        x = quantize_act(x, options.act_method, options.act_bits, clip=act_clip, step=act_step,
                         signed=options.act_signed, granularity=options.act_granularity, sync=options.act_sync)
    if options.weight_method is not None:
        if options.weight_method == "lat" and weight_scale is None:
            raise ValueError("weight_method='lat' needs weight_scale and weight_threshold (lat_scale_threshold)")
        weight = quantize_weight(
            weight, options.weight_method, options.granularity, options.ste, scale=weight_scale,
            threshold=weight_threshold,
        )
    return F.linear(x, weight, bias)
