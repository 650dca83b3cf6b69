"""Drop-in quantized Linear layers: ``QuantLinear`` / ``BinaryLinear`` / ``TernaryLinear``, and ``QuantConv1D`` for
the transposed-weight ``Conv1D`` of the GPT-2 family.

The latent full-precision weight stays the ``weight`` Parameter, so a state dict of a quantized layer holds
the same ``weight``/``bias`` keys as ``nn.Linear`` (plus the activation quantizer's parameters), and
``from_linear``/``to_linear`` share the Parameters instead of copying them.

Non-finite latent weights: a quantizer's scale is a reduction over the whole matrix, so one NaN or inf would turn
every output of the layer into garbage (for TWN: every code 0, the output equal to the bias). The forward therefore
raises a ValueError naming the layer instead (``check_finite``). The check is ``isfinite(weight.sum())`` read on the
host: one extra reduction pass over the weight and one device-to-host synchronization per layer and forward on CUDA (the
launch queue drains at every quantized layer). It is skipped under ``torch.compile`` (a data-dependent branch would
break the graph) and can be turned off per layer or for the class with ``check_finite = False``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from triton_bq import ops, reference
from triton_bq.nn.activation import ActQuantizer, second_moment_of
from triton_bq.options import QuantOptions, check_act_bits, check_choice

__all__ = ["BinaryLinear", "QuantConv1D", "QuantLinear", "TernaryLinear", "check_finite_weight"]


def check_finite_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Raise a ValueError naming ``module`` when ``weight`` holds a NaN or an infinity (see the module docstring for the
    cost: a host synchronization); no-op under ``torch.compile`` or when ``module.check_finite`` is false."""
    if not getattr(module, "check_finite", True) or torch.compiler.is_compiling():
        return
    weight = weight.detach()
    # One fused reduction (no boolean copy of the weight): the float32 sum is non-finite iff an element is, except
    # for an overflow of finite values, which the exact element-wise check below rules out on the error path.
    if bool(torch.isfinite(weight.sum(dtype=torch.float32))):
        return
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        name = getattr(module, "layer_name", None) or type(module).__name__
        raise ValueError(
            f"{name}: the latent weight has {int((~finite).sum())} non-finite value(s) (NaN or inf) of "
            f"{weight.numel()}; its quantization scale would be non-finite. Check the learning rate / loss scale, or "
            f"restore a finite checkpoint"
        )


def _make_act_quantizer(act_bits, act_method, act_signed, clip_init, act_granularity="per_tensor", act_sync=True):
    if act_bits is None:
        if act_method is not None:
            raise ValueError(f"act_method={act_method!r} needs act_bits, got act_bits=None")
        return None
    check_act_bits(act_bits)
    return ActQuantizer(act_bits, act_method, act_signed, clip_init, act_granularity, act_sync)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight (and optionally input) is fake-quantized on the fly.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        weight_method: ``"bwn"`` (binary), ``"twn"`` (ternary), ``"lat"`` (loss-aware ternary, reads Adam's
            second moment after ``triton_bq.attach_optimizer``) or ``None`` (full precision).
        granularity: ``"tensor"`` (one scale per matrix, the paper's choice) or ``"row"`` (per output feature).
        ste: ``"identity"`` (default) or ``"clipped"`` straight-through estimator.
        act_bits: ``None`` (no activation quantization), 8 or 4 (any of 2..8).
        act_method: ``None`` picks ``"sym"`` for 8 bits and ``"lsq"`` below; or ``"sym"``/``"asym"``/``"lsq"``/
            ``"asym_lsq"`` (BinaryBERT's asymmetric LSQ).
        act_signed: LSQ only; ``False`` for non-negative inputs.
        clip_init: initial activation clip ``[-clip_init, clip_init]`` for ``sym``/``asym``.
        act_granularity: ``"per_tensor"`` (one measured sym / asym scale, the papers') or ``"per_token"`` (one per
            row of the input, for causal LMs); see ``ActQuantizer``.
        act_sync: synchronize per-tensor scales and the LSQ element count across data-parallel ranks while
            training (``ActQuantizer``'s ``sync``).
        backend: ``"auto"`` (fused Triton kernels for CUDA tensors, reference otherwise), ``"triton"``,
            ``"reference"``.

    ``layer_name`` (set by ``triton_bq.quantize_`` to the module's name in the model) names the layer in errors;
    ``check_finite`` (default ``True``) raises on non-finite latent weights (module docstring for the cost).
    """

    layer_name: str | None = None
    check_finite: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_method: str | None = "bwn",
        granularity: str = "tensor",
        ste: str = "identity",
        act_bits: int | None = None,
        act_method: str | None = None,
        act_signed: bool = True,
        clip_init: float = 2.5,
        act_granularity: str = "per_tensor",
        act_sync: bool = True,
        backend: str = "auto",
    ):
        options = QuantOptions(weight_method, granularity, ste)
        check_choice("backend", backend, ops.BACKENDS)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.options, self.backend = options, backend
        self.act_quantizer = _make_act_quantizer(act_bits, act_method, act_signed, clip_init, act_granularity, act_sync)
        if self.act_quantizer is not None and device is not None and torch.device(device).type != "meta":
            self.act_quantizer.to(device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> QuantLinear:
        """Wrap an ``nn.Linear``, sharing its ``weight``/``bias`` Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls._sharing(linear.in_features, linear.out_features, linear.weight, linear.bias, linear.training,
                            options)

    @classmethod
    def _sharing(cls, in_features: int, out_features: int, weight, bias, training: bool, options: dict):
        """A layer built on the meta device whose ``weight`` / ``bias`` are the given Parameters."""
        module = cls(in_features, out_features, bias=bias is not None, device="meta", **options)
        module.weight, module.bias = weight, bias
        if module.act_quantizer is not None:
            module.act_quantizer.to(weight.device)
        module.train(training)
        return module

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's latent ``weight``/``bias`` Parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def linear_weight(self) -> torch.Tensor:
        """The latent weight in ``nn.Linear`` layout ``[out_features, in_features]`` (``QuantConv1D``: a transposed
        view of its ``[in_features, out_features]`` Parameter)."""
        return self.weight

    def second_moment(self) -> torch.Tensor | None:
        """Adam's ``exp_avg_sq`` of the weight in ``linear_weight`` layout (LAT), or ``None``."""
        return second_moment_of(self)

    def weight_scale_threshold(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(alpha, delta)`` as used in the forward pass (LAT reads the attached optimizer's state)."""
        if self.weight_method is None:
            return None, None
        moment = self.second_moment() if self.weight_method == "lat" else None
        return reference.weight_scale_threshold(self.linear_weight(), self.weight_method, self.granularity, moment)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``alpha * codes`` in ``[out_features, in_features]`` layout (a materialized copy;
        for inspection and export)."""
        weight = self.linear_weight()
        if self.weight_method is None:
            return weight.detach().clone()
        scale, threshold = self.weight_scale_threshold()
        with torch.no_grad():
            return (scale * reference.weight_codes(weight, threshold).float()).to(weight.dtype)

    @property
    def weight_method(self) -> str | None:
        """``"bwn"``, ``"twn"``, ``"lat"`` or ``None`` (``self.options.weight_method``)."""
        return self.options.weight_method

    @property
    def granularity(self) -> str:
        """Weight scale granularity, ``"tensor"`` or ``"row"`` (``self.options.granularity``)."""
        return self.options.granularity

    @property
    def ste(self) -> str:
        """Straight-through estimator, ``"identity"`` or ``"clipped"`` (``self.options.ste``)."""
        return self.options.ste

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        options, tensors = self.options, {}
        weight = self.linear_weight()
        if options.weight_method is not None:
            check_finite_weight(self, weight)
        if self.act_quantizer is not None:
            options, tensors = self.act_quantizer.op_options(options), self.act_quantizer.op_tensors(x)
        if options.weight_method == "lat":
            tensors["weight_scale"], tensors["weight_threshold"] = self.weight_scale_threshold()
        return ops.quant_linear(x, weight, self.bias, options, backend=self.backend, **tensors)

    def extra_repr(self) -> str:
        act = "None" if self.act_quantizer is None else f"{self.act_quantizer.bits}"
        return (
            f"{super().extra_repr()}, weight_method={self.weight_method!r}, granularity={self.granularity!r}, "
            f"ste={self.ste!r}, act_bits={act}, backend={self.backend!r}"
        )


class BinaryLinear(QuantLinear):
    """``QuantLinear`` with BWN binary weights ``mean|W| * sign(W)`` (sign(0) = +1). See ``QuantLinear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, **options):
        if options.setdefault("weight_method", "bwn") != "bwn":
            raise ValueError(f"BinaryLinear needs weight_method='bwn', got {options['weight_method']!r}")
        super().__init__(in_features, out_features, bias, device, dtype, **options)


class TernaryLinear(QuantLinear):
    """``QuantLinear`` with ternary weights: TWN (default) or loss-aware LAT (``weight_method="lat"``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, **options):
        if options.setdefault("weight_method", "twn") not in ("twn", "lat"):
            raise ValueError(f"TernaryLinear needs weight_method 'twn' or 'lat', got {options['weight_method']!r}")
        super().__init__(in_features, out_features, bias, device, dtype, **options)


class QuantConv1D(QuantLinear):
    """Quantized transformers ``Conv1D`` (GPT-2 family: ``y = x @ W + b`` with ``weight`` stored
    ``[in_features, out_features]``).

    The ``weight`` Parameter keeps ``Conv1D``'s layout, so state dict keys and shapes are those of the Hugging Face
    checkpoint; the quantizers and kernels see ``linear_weight()``, its ``[out_features, in_features]`` transposed
    view (no copy: the kernels take strided weights). Scales per ``"row"`` are per output feature, as for
    ``QuantLinear``. Options as ``QuantLinear`` (``weight_method`` ``"bwn"``, ``"twn"``, ``"lat"`` or ``None``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, **options):
        super().__init__(in_features, out_features, bias, device, dtype, **options)
        self.weight = nn.Parameter(self.weight.detach().t().contiguous())

    @classmethod
    def from_conv1d(cls, conv: nn.Module, **options) -> QuantConv1D:
        """Wrap a transformers ``Conv1D``, sharing its ``weight``/``bias`` Parameters (no copy)."""
        if not isinstance(conv, Conv1D):
            raise TypeError(f"conv must be a transformers Conv1D, got {type(conv).__name__}")
        return cls._sharing(conv.nx, conv.nf, conv.weight, conv.bias, conv.training, options)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> QuantLinear:
        raise TypeError("QuantConv1D wraps a transformers Conv1D: use QuantConv1D.from_conv1d")

    def to_conv1d(self) -> nn.Module:
        """A transformers ``Conv1D`` sharing this layer's latent ``weight``/``bias`` Parameters."""
        with torch.device("meta"):
            conv = Conv1D(self.out_features, self.in_features)
        conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def to_linear(self) -> nn.Linear:
        raise TypeError("QuantConv1D restores a transformers Conv1D: use to_conv1d")

    def linear_weight(self) -> torch.Tensor:
        return self.weight.t()

    def second_moment(self) -> torch.Tensor | None:
        moment = second_moment_of(self)
        return None if moment is None else moment.t()
