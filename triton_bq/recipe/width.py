"""Narrower students: keep the most important attention heads and FFN neurons of every BERT-style layer.

BinaryBERT splits a *half-width* ternary model (its teacher in the reference code is a DynaBERT width-0.5 model):
half the attention heads and half the FFN neurons of every layer, the hidden size unchanged, so the embedding
output, every hidden state and the kept heads' attention scores can still be distilled from the full-width
teacher. Ternary weight splitting then gives every matrix two binary halves, and the binary model has as many
1-bit weights as the half-width ternary model has 2-bit ones: about the size of a full-width binary BERT.

A *plan* records what is kept, per layer (module name): ``{"heads": [...], "neurons": [...]}``, sorted indices into
the teacher's heads and FFN neurons. ``width_plan`` keeps the most important ones, by

- data (``taylor_importance``, DynaBERT's criterion): removing head ``h`` is exactly zeroing its columns of the
  attention output projection ``W_O[:, h]`` (and neuron ``j``: column ``W_out[:, j]`` of FFN-out), so the first-order
  change of the loss is ``-<W_O[:, h], dL/dW_O[:, h]>``; the importance is its magnitude, summed over a few batches
  before taking ``abs``;
- or, with no data, weight magnitude: head ``h``: ``||W_V[h]||_F * ||W_O[:, h]||_F`` (the value and output slices
  its contribution passes through); neuron ``j``: ``||W_in[j, :]||_2 * ||W_out[:, j]||_2``.

Ties keep the lower index. On the meta device (no values) the first heads and neurons are kept.
``shrink_width_`` applies a plan (or a width) in place; the plan is JSON-serializable, so a saved narrow model is
rebuilt by applying the same plan to a fresh full-width model before loading its state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from triton_bq.convert import record_quantization
from triton_bq.nn.attention import is_bert_self_attention

__all__ = ["bert_layers", "supports_width", "taylor_importance", "width_plan", "shrink_width_", "kept_heads"]


def bert_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BERT-style layers of ``model`` in order: modules with ``attention.self`` (a BERT self-attention),
    ``attention.output.dense``, ``intermediate.dense`` and ``output.dense`` (BERT, RoBERTa, ELECTRA, MiniLM, ...)."""
    layers = []
    for name, module in model.named_modules():
        attention = getattr(module, "attention", None)
        self_attention = getattr(attention, "self", None)
        if (
            isinstance(self_attention, nn.Module)
            and is_bert_self_attention(self_attention)
            and isinstance(getattr(getattr(attention, "output", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(module, "intermediate", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(module, "output", None), "dense", None), nn.Linear)
        ):
            layers.append((name, module))
    return layers


def _kept_count(total: int, width: float) -> int | None:
    count = width * total
    return round(count) if math.isclose(count, round(count)) and round(count) >= 1 else None


def _check_width(width) -> None:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        raise ValueError(f"width must be a number in (0, 1], got {width!r}")


def supports_width(model: nn.Module, width: float) -> bool:
    """Whether ``model`` has BERT-style layers whose head and FFN-neuron counts ``width`` divides into whole
    numbers (at least one of each), i.e. whether ``shrink_width_(model, width)`` applies."""
    _check_width(width)
    layers = bert_layers(model)
    return bool(layers) and all(
        _kept_count(layer.attention.self.num_attention_heads, width) is not None
        and _kept_count(layer.intermediate.dense.out_features, width) is not None
        for _, layer in layers
    )


def _top(importance: torch.Tensor, count: int) -> list[int]:
    if importance.is_meta:
        return list(range(count))
    order = torch.argsort(importance.double(), descending=True, stable=True)
    return sorted(order[:count].tolist())


def _head_columns(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` shaped like ``W_O`` ``[hidden, heads * head_size]`` as ``[hidden, heads, head_size]``."""
    attention = layer.attention.self
    return tensor.reshape(tensor.shape[0], attention.num_attention_heads, attention.attention_head_size)


def taylor_importance(
    model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """First-order Taylor importance of every head and FFN neuron of ``model``'s BERT-style layers (module docstring).

    Args:
        model: the full-width model (its ``.grad`` fields are used and cleared; train/eval mode is restored).
        batches: an iterable of inputs, e.g. a few dict batches of a Hugging Face model with ``labels``.
        loss_fn: ``(model, batch) -> scalar loss``; default ``model(**batch).loss``.

    Returns ``{layer: {"heads": [heads], "neurons": [neurons]}}`` float64 tensors, for ``width_plan(importance=...)``.
    Runs in eval mode (no dropout), so the same batches always give the same importance.
    """
    layers = bert_layers(model)
    if not layers:
        raise ValueError(f"model has no BERT-style layers to rank ({type(model).__name__})")
    loss_fn = loss_fn or (lambda module, batch: module(**batch).loss)
    training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    count = 0
    try:
        for batch in batches:
            loss_fn(model, batch).backward()
            count += 1
        if count == 0:
            raise ValueError("batches is empty: taylor_importance needs at least one batch")
        importance = {}
        for name, layer in layers:
            output, ffn_out = layer.attention.output.dense.weight, layer.output.dense.weight
            if output.grad is None or ffn_out.grad is None:
                raise ValueError(f"the loss does not reach layer {name!r}: no gradient of its output projections")
            importance[name] = {
                "heads": _head_columns(layer, output.detach().double() * output.grad.double()).sum((0, 2)).abs(),
                "neurons": (ffn_out.detach().double() * ffn_out.grad.double()).sum(0).abs(),
            }
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
    return importance


def width_plan(
    model: nn.Module, width: float = 0.5, importance: dict[str, dict[str, torch.Tensor]] | None = None
) -> dict[str, dict[str, list[int]]]:
    """The heads and FFN neurons to keep in every BERT-style layer at ``width``: the most important by
    ``importance`` (``taylor_importance``), else by weight magnitude (module docstring)."""
    if not supports_width(model, width):
        raise ValueError(
            f"width={width} does not apply to {type(model).__name__}: it needs BERT-style layers whose head and FFN "
            f"neuron counts times width are whole numbers >= 1"
        )
    layers = bert_layers(model)
    if importance is not None and set(importance) != {name for name, _ in layers}:
        raise ValueError(f"importance names layers {sorted(importance)}, the model has {[n for n, _ in layers]}")
    plan = {}
    for name, layer in layers:
        heads = layer.attention.self.num_attention_heads
        neurons = layer.intermediate.dense.out_features
        if importance is not None:
            head_importance, neuron_importance = importance[name]["heads"], importance[name]["neurons"]
            if head_importance.shape != (heads,) or neuron_importance.shape != (neurons,):
                raise ValueError(f"importance[{name!r}] must hold {heads} head and {neurons} neuron values, got "
                                 f"{tuple(head_importance.shape)} and {tuple(neuron_importance.shape)}")
        else:
            value = layer.attention.self.value.weight.detach().float()
            output = layer.attention.output.dense.weight.detach().float()
            head_importance = (_head_columns(layer, value.t()).square().sum((0, 2)).sqrt()
                               * _head_columns(layer, output).square().sum((0, 2)).sqrt())
            ffn_in, ffn_out = layer.intermediate.dense.weight.detach().float(), layer.output.dense.weight.detach()
            neuron_importance = ffn_in.norm(dim=1) * ffn_out.float().norm(dim=0)
        plan[name] = {
            "heads": _top(head_importance, _kept_count(heads, width)),
            "neurons": _top(neuron_importance, _kept_count(neurons, width)),
        }
    return plan


def _select(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep the rows (``dim=0``: output features, with the bias) or columns (``dim=1``) ``index`` of ``linear``."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(dim, index).clone(),
                                 requires_grad=linear.weight.requires_grad)
    if dim == 0:
        linear.out_features = index.numel()
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).clone(),
                                       requires_grad=linear.bias.requires_grad)
    else:
        linear.in_features = index.numel()


def _indices(kept: dict, key: str, total: int, layer: str) -> torch.Tensor:
    values = kept.get(key)
    if not values or len(set(values)) != len(values) or any(not 0 <= int(v) < total for v in values):
        raise ValueError(f"plan[{layer!r}][{key!r}] must be distinct indices in [0, {total}), got {values!r}")
    return torch.tensor(sorted(int(v) for v in values))


def shrink_width_(model: nn.Module, plan_or_width: dict | float = 0.5) -> dict[str, dict[str, list[int]]]:
    """Keep only the planned heads and FFN neurons of every BERT-style layer of ``model``, in place.

    Args:
        model: a full-width model (plain ``nn.Linear`` layers, or quantized ones: their weights are sliced the same).
        plan_or_width: a plan (``width_plan``) or a width in (0, 1] to compute one.

    Returns the plan applied. Query/key/value lose the rows of the dropped heads and the attention output projection
    their columns; FFN-in loses the rows of the dropped neurons and FFN-out their columns. The hidden size does not
    change. The model computes exactly what the full model computes with the dropped heads' and neurons'
    contributions removed.
    """
    plan = width_plan(model, plan_or_width) if not isinstance(plan_or_width, dict) else plan_or_width
    layers = dict(bert_layers(model))
    if set(plan) != set(layers):
        raise ValueError(f"the plan names layers {sorted(plan)}, the model has {sorted(layers)}")
    counts = {name: (layer.attention.self.num_attention_heads, layer.intermediate.dense.out_features)
              for name, layer in layers.items()}
    for name, kept in plan.items():
        layer = layers[name]
        attention = layer.attention.self
        heads, head_size = attention.num_attention_heads, attention.attention_head_size
        head_index = _indices(kept, "heads", heads, name)
        neuron_index = _indices(kept, "neurons", layer.intermediate.dense.out_features, name)
        rows = (head_index[:, None] * head_size + torch.arange(head_size)).reshape(-1)
        for projection in (attention.query, attention.key, attention.value):
            _select(projection, rows, 0)
        _select(layer.attention.output.dense, rows, 1)
        attention.num_attention_heads = head_index.numel()
        attention.all_head_size = rows.numel()
        _select(layer.intermediate.dense, neuron_index, 0)
        _select(layer.output.dense, neuron_index, 1)
    applied = {name: {"heads": sorted(kept["heads"]), "neurons": sorted(kept["neurons"])}
               for name, kept in plan.items()}
    record_quantization(model, width_plan=applied, width_counts=counts)
    return applied


def kept_heads(model: nn.Module, plan: dict[str, dict[str, list[int]]]) -> list[list[int]]:
    """The kept head indices of every BERT-style layer of ``model`` (full-width or shrunk), in model order: select
    the teacher's attention scores with them (``teacher_scores[i][:, kept_heads(teacher, plan)[i]]``) to distil a
    narrow student's attention."""
    names = [name for name, _ in bert_layers(model)]
    if set(names) != set(plan):
        raise ValueError(f"the plan names layers {sorted(plan)}, the model has {sorted(names)}")
    return [plan[name]["heads"] for name in names]
