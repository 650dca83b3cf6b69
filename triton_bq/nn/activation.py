"""Quantizer modules: learnable activation quantizers and the optimizer link for loss-aware ternarization."""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from triton_bq import reference
from triton_bq.options import ACT_GRANULARITIES, LSQ_METHODS, QuantOptions, check_choice

__all__ = ["ActQuantizer", "attach_optimizer", "default_act_method", "load_second_moments", "second_moment_of",
           "second_moments"]


def default_act_method(bits: int) -> str:
    """BinaryBERT/TernaryBERT defaults: 8-bit symmetric uniform with a learnable clip, 4-bit (or less) LSQ."""
    return "sym" if bits == 8 else "lsq"


class ActQuantizer(nn.Module):
    """Activation fake-quantizer with learnable parameters.

    ``method="sym"``/``"asym"`` hold a learnable clip pair ``clip = [lo, hi]`` (init ``[-clip_init, clip_init]``,
    PACT-style gradient) and measure their step (and zero point) from the input: one per tensor
    (``granularity="per_tensor"``, the papers') or one per token (``"per_token"``, a row of the last dim: what a
    causal LM needs, since no token's codes then depend on later tokens or on other samples). ``method="lsq"``
    holds a learnable ``step`` (shape ``[1]``) initialised from the first non-empty batch it sees (``2 * mean|x| /
    sqrt(qmax)``, averaged over processes under ``torch.distributed``). ``method="asym_lsq"`` (BinaryBERT's
    ``AsymLsqQuantizer``) holds the same learnable step (initialised to ``4 * mean|x| / sqrt(2^bits - 1)``) and
    shifts by the input's dynamic min (per tensor, or per token with ``granularity="per_token"``): codes
    ``0..2^bits - 1``.

    ``sync`` (default on): while training under an initialized ``torch.distributed``, per-tensor min / max are
    all-reduced over the default process group (every data-parallel rank quantizes with the global batch's scale,
    as one process would; the asym_lsq min too) and the LSQ step gradient counts the global batch's elements.
    Evaluation never synchronizes: ranks may evaluate alone (rank-0-only evaluation would otherwise hang).
    Under FSDP2 ``fully_shard``, initialize the LSQ steps before sharding (one forward on a batch): inside a sharded
    forward the step is an all-gathered copy, and the initial value written to it would not reach the shard.
    Call it on a tensor to fake-quantize it, or give ``op_options`` / ``op_tensors`` to ``quant_linear`` to fuse it.
    """

    def __init__(
        self,
        bits: int = 8,
        method: str | None = None,
        signed: bool = True,
        clip_init: float = 2.5,
        granularity: str = "per_tensor",
        sync: bool = True,
    ):
        super().__init__()
        method = default_act_method(bits) if method is None else method
        reference.act_qrange(method, bits, signed)
        check_choice("granularity", granularity, ACT_GRANULARITIES)
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        if method not in LSQ_METHODS and not clip_init > 0:
            raise ValueError(f"clip_init must be > 0, got {clip_init!r}")
        self.bits, self.method, self.signed = bits, method, bool(signed)
        self.granularity, self.sync = granularity, sync
        self._options_key = self._options = None
        if method in LSQ_METHODS:
            # 1-D (not 0-D): FSDP2's fully_shard rejects scalar Parameters. 0-D steps of older state dicts load.
            self.step = nn.Parameter(torch.ones(1))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
            self._initialized_seen = False
        else:
            self.clip = nn.Parameter(torch.tensor([-float(clip_init), float(clip_init)]))

    def _maybe_init_step(self, x: torch.Tensor) -> None:
        # An empty batch carries no statistics: the step waits for the first non-empty one.
        if self.method not in LSQ_METHODS or self._initialized_seen or x.numel() == 0:
            return
        if not bool(self.initialized):
            step = reference.lsq_init_step(x, self.bits, self.signed, self.method).to(self.step.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(step)
                step /= torch.distributed.get_world_size()
            with torch.no_grad():
                self.step.copy_(step)
                self.initialized.fill_(True)
        self._initialized_seen = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        step = state_dict.get(prefix + "step")
        if self.method in LSQ_METHODS and isinstance(step, torch.Tensor) and step.dim() == 0:
            state_dict[prefix + "step"] = step.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.method in LSQ_METHODS:
            self._initialized_seen = False

    def op_options(self, options: QuantOptions) -> QuantOptions:
        """``options`` with this quantizer's input settings (``act_method``, ``act_bits``, ``act_signed``,
        ``act_granularity``, and ``act_sync`` while training)."""
        sync = self.sync and self.training
        key = (options, self.method, self.bits, self.signed, self.granularity, sync)
        if self._options_key != key:
            self._options_key = key
            self._options = options.replace(
                act_method=self.method, act_bits=self.bits, act_signed=self.signed,
                act_granularity=self.granularity, act_sync=sync,
            )
        return self._options

    def op_tensors(self, x: torch.Tensor) -> dict:
        """The learned tensors ``quant_linear`` takes beside its options (initializes the LSQ step from ``x``)."""
        self._maybe_init_step(x)
        return dict(act_clip=getattr(self, "clip", None), act_step=getattr(self, "step", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.op_tensors(x)
        return reference.quantize_act(
            x, self.method, self.bits, clip=tensors["act_clip"], step=tensors["act_step"], signed=self.signed,
            granularity=self.granularity, sync=self.sync and self.training,
        )

    def extra_repr(self) -> str:
        signed = "" if self.method != "lsq" else f", signed={self.signed}"
        granularity = "" if self.method == "lsq" else f", granularity={self.granularity!r}"  # plain LSQ ignores it
        return f"bits={self.bits}, method={self.method!r}{signed}{granularity}"


class _OptimizerLink:
    """A loss-aware module's link to the optimizer whose Adam state it reads (a weak reference: the optimizer is
    not saved with the model).

    A copy of the model (``copy.deepcopy``, pickling, ``torch.save``) cannot keep the link: the copy's Parameters are
    new objects, absent from the optimizer's state, and a weak reference does not pickle. The copy gets a
    ``_FrozenMoment`` instead: the second moment as it is now, so the copy computes exactly what the original computes
    at the time of the copy. A warning says so; ``attach_optimizer(copy, optimizer)`` links the copy to a new optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, weight: nn.Parameter):
        self.optimizer = weakref.ref(optimizer)
        self.weight = weakref.ref(weight)

    def second_moment(self, weight: torch.Tensor) -> torch.Tensor | None:
        optimizer = self.optimizer()
        if optimizer is None:
            return None
        return optimizer.state.get(weight, {}).get("exp_avg_sq")

    def is_alive(self) -> bool:
        return self.optimizer() is not None

    def _frozen(self) -> _FrozenMoment:
        weight = self.weight()
        moment = None if weight is None else self.second_moment(weight)
        warnings.warn(
            "copying a weight_method='lat' model: its optimizer link is replaced by a frozen copy of Adam's second "
            "moment (same outputs as now). Call triton_bq.attach_optimizer(model, optimizer) to train the copy.",
            stacklevel=3,
        )
        return _FrozenMoment(None if moment is None else moment.detach().clone())

    def __deepcopy__(self, memo) -> _FrozenMoment:
        return self._frozen()

    def __reduce__(self):
        return _FrozenMoment, (self._frozen().moment,)


class _FrozenMoment:
    """The second moment a copied loss-aware module keeps from its original's optimizer (``_OptimizerLink``)."""

    def __init__(self, moment: torch.Tensor | None):
        self.moment = moment

    def second_moment(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.moment is None or self.moment.shape != weight.shape:
            return None
        return self.moment.to(weight.device)

    def is_alive(self) -> bool:
        return True


def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Let every loss-aware (``weight_method="lat"``) module read Adam's ``exp_avg_sq`` of its weight.

    Returns how many modules were linked. Keeps a weak reference: the optimizer is not saved with the model. A copy
    of the model (``copy.deepcopy``, pickling) keeps the second moment as it was at the copy (same outputs, with a
    warning) until it is attached to an optimizer of its own.
    """
    if not hasattr(optimizer, "state"):
        raise TypeError(f"optimizer must be a torch optimizer with a .state, got {type(optimizer).__name__}")
    linked = 0
    for module in model.modules():
        if getattr(module, "weight_method", None) == "lat":
            module._lat_optimizer = _OptimizerLink(optimizer, module.weight)
            linked += 1
    return linked


def second_moment_of(module: nn.Module) -> torch.Tensor | None:
    """Adam's ``exp_avg_sq`` of ``module.weight`` if an optimizer is attached and has stepped, else ``None``.

    Without an attached optimizer the loss-aware quantizer falls back to ``D = 1`` (plain TWN-initialised
    alternation) and warns once per module while training. A copied module reads the second moment frozen at the copy.
    """
    link = getattr(module, "_lat_optimizer", None)
    if link is None or not link.is_alive():
        if module.training and not getattr(module, "_lat_warned", False):
            warnings.warn(
                "weight_method='lat' without an optimizer: using D = 1. Call "
                "triton_bq.attach_optimizer(model, optimizer) to use Adam's second moment.",
                stacklevel=3,
            )
            module._lat_warned = True
        return None
    return link.second_moment(module.weight)


def second_moments(model: nn.Module) -> dict[str, torch.Tensor]:
    """The second moment each loss-aware (``weight_method="lat"``) module of ``model`` quantizes with now, by module
    name (modules without one, e.g. before the optimizer's first step, are left out).

    Saved beside the weights, it lets a reloaded model quantize exactly as this one does (``load_second_moments``).
    """
    moments = {}
    for name, module in model.named_modules():
        if getattr(module, "weight_method", None) == "lat":
            moment = second_moment_of(module)
            if moment is not None:
                moments[name] = moment.detach().clone()
    return moments


def load_second_moments(model: nn.Module, moments: dict[str, torch.Tensor]) -> int:
    """Give the loss-aware modules named in ``moments`` (from ``second_moments``) those second moments, frozen (as a
    copied model keeps them, until ``attach_optimizer`` links the model to an optimizer). Returns how many.

    Raises ValueError for a name that is no loss-aware module of ``model`` or a moment of another shape than the
    module's weight.
    """
    modules = dict(model.named_modules())
    for name, moment in moments.items():
        module = modules.get(name)
        if module is None or getattr(module, "weight_method", None) != "lat":
            raise ValueError(f"moments[{name!r}]: {name!r} is not a weight_method='lat' module of this model")
        if not isinstance(moment, torch.Tensor) or moment.shape != module.weight.shape:
            shape = tuple(moment.shape) if isinstance(moment, torch.Tensor) else type(moment).__name__
            raise ValueError(f"moments[{name!r}] must have the shape of its weight {tuple(module.weight.shape)}, "
                             f"got {shape}")
    for name, moment in moments.items():
        modules[name]._lat_optimizer = _FrozenMoment(moment.detach().clone())
    return len(moments)
