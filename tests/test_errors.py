"""Every argument check of the package reached, one parametrized table per module.

Each row calls the public function with one bad argument and matches the message on the argument's name and the
bad value it was given (house rule: ValueError/TypeError naming both, never a crash deep inside a kernel).
"""

import json
import re

import pytest
import safetensors.torch
import torch
from tiny_bert import tiny_bert
from torch import nn
from triton_bq.kernels import _common, configs, scales
from triton_bq.kernels import packed_matmul as pm
from triton_bq.kernels.linear import fused_quant_linear

import triton_bq
from triton_bq import bitpack, ops
from triton_bq import reference as ref
from triton_bq.convert import QuantConfig, quantize_
from triton_bq.export import format as export_format
from triton_bq.export import size
from triton_bq.export.format import FORMAT, MANIFEST_NAME
from triton_bq.nn import SplitBinaryEmbedding, SplitBinaryLinear
from triton_bq.nn.activation import ActQuantizer, attach_optimizer
from triton_bq.nn.attention import dequantize_attention, quantize_attention
from triton_bq.nn.embedding import QuantEmbedding
from triton_bq.nn.linear import BinaryLinear, QuantLinear, TernaryLinear
from triton_bq.nn.packed import PackedEmbedding, PackedLinear, PackedSplitLinear
from triton_bq.options import QuantOptions, check_act_bits, check_choice
from triton_bq.recipe import adaptive, distill, tws, width

W = torch.linspace(-1, 1, 12).reshape(3, 4)
X = torch.linspace(-1, 1, 8).reshape(2, 4)


def _case(name, call, error, match):
    return pytest.param(call, error, match, id=name)


def _check(call, error, match):
    with pytest.raises(error, match=match):
        call()


OPTIONS_CASES = [
    _case("choice", lambda: check_choice("granularity", "col", ("tensor", "row")), ValueError,
          r"granularity must be one of \('tensor', 'row'\), got 'col'"),
    _case("act-bits", lambda: check_act_bits(9), ValueError, r"act_bits must be an int in 2\.\.8, got 9"),
    _case("act-bits-bool", lambda: check_act_bits(True), ValueError, r"act_bits must be an int in 2\.\.8, got True"),
    _case("act-signed", lambda: QuantOptions(act_signed=1), TypeError, r"act_signed must be a bool, got int"),
    _case("weight-method", lambda: QuantOptions(weight_method="xnor"), ValueError,
          r"weight_method must be one of .*, got 'xnor'"),
]

REFERENCE_CASES = [
    _case("row-needs-2d", lambda: ref.mean_abs(torch.ones(2, 3, 4), "row"), ValueError,
          r"granularity='row' needs a 2-D weight, got shape \(2, 3, 4\)"),
    _case("lat-iterations", lambda: ref.lat_scale_threshold(W, None, iterations=0), ValueError,
          r"iterations must be a positive int, got 0"),
    _case("lat-moment-shape", lambda: ref.lat_scale_threshold(W, torch.ones(4, 3)), ValueError,
          r"second_moment shape \(4, 3\) does not match weight shape \(3, 4\)"),
    _case("scale-without-threshold", lambda: ref.quantize_weight(W, "twn", scale=torch.tensor(1.0)), ValueError,
          r"scale and threshold must be given together for twn/lat"),
    _case("act-params-lsq-step", lambda: ref.act_params(X, "lsq", 4), ValueError,
          r"act_method='lsq' needs act_step"),
    _case("act-params-clip", lambda: ref.act_params(X, "sym", 8, clip=torch.ones(3)), ValueError,
          r"act_method='sym' needs act_clip of 2 elements \(lo, hi\), got tensor\(\[1\., 1\., 1\.\]\)"),
    _case("quantize-act-lsq-step", lambda: ref.quantize_act(X, "lsq", 4), ValueError,
          r"act_method='lsq' needs act_step"),
    _case("quantize-act-clip", lambda: ref.quantize_act(X, "asym", 8, clip=None), ValueError,
          r"act_method='asym' needs act_clip of 2 elements \(lo, hi\), got None"),
    _case("quant-linear-lat", lambda: ref.quant_linear(X, W, None, QuantOptions("lat")), ValueError,
          r"weight_method='lat' needs weight_scale and weight_threshold"),
    _case("act-method", lambda: ref.act_qrange("minmax", 8), ValueError, r"act_method must be one of .*'minmax'"),
]

CONVERT_CASES = [
    _case("act-bits", lambda: QuantConfig(act_bits=1), ValueError, r"act_bits must be None or an int in 2\.\.8, got 1"),
    _case("config-type", lambda: quantize_(nn.Linear(2, 2), {"weight_method": "bwn"}), TypeError,
          r"config must be a QuantConfig, got dict"),
    _case("model-type", lambda: quantize_("bert", QuantConfig()), TypeError, r"model must be an nn.Module, got str"),
    _case("embedding-method", lambda: QuantConfig(embedding_method="int8"), ValueError,
          r"embedding_method must be one of .*, got 'int8'"),
]

NN_CASES = [
    _case("clip-init", lambda: ActQuantizer(8, clip_init=0.0), ValueError, r"clip_init must be > 0, got 0\.0"),
    _case("optimizer", lambda: attach_optimizer(nn.Linear(2, 2), "adam"), TypeError,
          r"optimizer must be a torch optimizer with a \.state, got str"),
    _case("attention-module", lambda: quantize_attention(nn.Linear(2, 2)), TypeError,
          r"module must be a Hugging Face attention computing through transformers' attention interface, got Linear"),
    _case("dequantize-attention", lambda: dequantize_attention(nn.Linear(2, 2)), TypeError,
          r"module is not a quantized attention, got Linear"),
    _case("act-method-without-bits", lambda: QuantLinear(4, 3, act_method="sym"), ValueError,
          r"act_method='sym' needs act_bits, got act_bits=None"),
    _case("from-linear", lambda: QuantLinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError,
          r"linear must be an nn.Linear, got Conv1d"),
    _case("binary-method", lambda: BinaryLinear(4, 3, weight_method="twn"), ValueError,
          r"BinaryLinear needs weight_method='bwn', got 'twn'"),
    _case("ternary-method", lambda: TernaryLinear(4, 3, weight_method="bwn"), ValueError,
          r"TernaryLinear needs weight_method 'twn' or 'lat', got 'bwn'"),
    _case("backend", lambda: QuantLinear(4, 3, backend="cuda"), ValueError,
          r"backend must be one of .*, got 'cuda'"),
    _case("from-embedding", lambda: QuantEmbedding.from_embedding(nn.Linear(2, 2)), TypeError,
          r"embedding must be an nn.Embedding, got Linear"),
    _case("embedding-max-norm", lambda: QuantEmbedding.from_embedding(nn.Embedding(5, 4, max_norm=1.0)), ValueError,
          r"QuantEmbedding does not support max_norm or sparse embeddings"),
    _case("split-half-type", lambda: SplitBinaryLinear.from_halves(nn.Linear(4, 3), BinaryLinear(4, 3)), TypeError,
          r"half1 must be a BinaryLinear, got Linear"),
    _case("split-half-shape", lambda: SplitBinaryLinear.from_halves(BinaryLinear(4, 3), BinaryLinear(5, 3)),
          ValueError, r"half1 and half2 must have the same shape, got \(3, 4\) and \(3, 5\)"),
    _case("split-half-options",
          lambda: SplitBinaryLinear.from_halves(BinaryLinear(4, 3), BinaryLinear(4, 3, granularity="row")),
          ValueError, r"half1 and half2 must share granularity and ste, got \('tensor', 'identity'\) and "
                      r"\('row', 'identity'\)"),
    _case("split-embedding-type",
          lambda: SplitBinaryEmbedding.from_halves(QuantEmbedding(5, 4), QuantEmbedding(5, 4, weight_method="twn")),
          TypeError, r"half2 must be a QuantEmbedding with weight_method='bwn', got QuantEmbedding"),
    _case("split-embedding-shape",
          lambda: SplitBinaryEmbedding.from_halves(QuantEmbedding(5, 4), QuantEmbedding(6, 4)), ValueError,
          r"half1 and half2 must have the same shape and padding_idx, got \(5, 4\), None and \(6, 4\), None"),
]

OPS_CASES = [
    _case("backend", lambda: ops.resolve_backend("gpu", X), ValueError, r"backend must be one of .*, got 'gpu'"),
    _case("x-type", lambda: ops.quant_linear([1.0], W), TypeError,
          r"x and weight must be tensors, got list and Tensor"),
    _case("options-type", lambda: ops.quant_linear(X, W, None, "bwn"), TypeError,
          r"options must be a triton_bq.QuantOptions, got str"),
    _case("x-dtype", lambda: ops.quant_linear(X.long(), W), TypeError,
          r"x must be a floating-point tensor, got dtype torch.int64"),
    _case("weight-dim", lambda: ops.quant_linear(X, W.reshape(-1)), ValueError,
          r"weight must be 2-D \[out_features, in_features\], got shape \(12,\)"),
    _case("x-last-dim", lambda: ops.quant_linear(X[:, :3], W), ValueError,
          r"x's last dim must equal weight.shape\[1\]=4, got x of shape \(2, 3\)"),
    _case("bias-shape", lambda: ops.quant_linear(X, W, torch.ones(4)), ValueError,
          r"bias must have shape \(3,\), got \(4,\)"),
    _case("lsq-step", lambda: ops.quant_linear(X, W, None, QuantOptions(act_method="lsq", act_bits=4),
                                               act_step=torch.ones(2)), ValueError,
          r"act_method='lsq' needs a one-element act_step, got tensor\(\[1\., 1\.\]\)"),
    _case("clip", lambda: ops.quant_linear(X, W, None, QuantOptions(act_method="sym")), ValueError,
          r"act_method='sym' needs act_clip with 2 elements \(lo, hi\), got None"),
    _case("lat", lambda: ops.quant_linear(X, W, None, QuantOptions("lat")), ValueError,
          r"weight_method='lat' needs weight_scale and weight_threshold"),
    _case("embedding-ids", lambda: ops.quant_embedding(torch.ones(3), W), TypeError,
          r"input_ids must be int32/int64, got dtype torch.float32"),
    _case("embedding-weight", lambda: ops.quant_embedding(torch.ones(3, dtype=torch.long), W.reshape(-1)), ValueError,
          r"weight must be 2-D \[num_embeddings, dim\], got shape \(12,\)"),
]


def _packed():
    return bitpack.pack_weight(W, "bwn")


PACKED_CASES = [
    _case("linear-parts", lambda: PackedLinear(4, 3, parts=3), ValueError, r"parts must be 1 or 2, got 3"),
    _case("linear-granularity", lambda: PackedLinear(4, 3, granularity="col"), ValueError,
          r"granularity must be one of \('tensor', 'row'\), got 'col'"),
    _case("linear-out-features", lambda: PackedLinear(4, 0), ValueError, r"out_features must be a positive int, got 0"),
    _case("linear-in-features", lambda: PackedLinear(0, 3), ValueError, r"in_features must be a positive int, got 0"),
    _case("linear-bits", lambda: PackedLinear(4, 3, bits=3), ValueError,
          r"bits must be 1 \(binary\) or 2 \(ternary\), got 3"),
    _case("from-packed", lambda: PackedLinear.from_packed(W), TypeError, r"packed must be a PackedWeight, got Tensor"),
    _case("from-quant-linear-type", lambda: PackedLinear.from_quant_linear(nn.Linear(4, 3)), TypeError,
          r"module must be a triton_bq.QuantLinear, got Linear"),
    _case("from-quant-linear-fp", lambda: PackedLinear.from_quant_linear(QuantLinear(4, 3, weight_method=None)),
          ValueError, r"module has weight_method=None: a full-precision weight has nothing to pack"),
    _case("split-half-type", lambda: PackedSplitLinear(PackedLinear(4, 3), nn.Linear(4, 3)), TypeError,
          r"half2 must be a PackedLinear, got Linear"),
    _case("split-half-shape", lambda: PackedSplitLinear(PackedLinear(4, 3), PackedLinear(5, 3)), ValueError,
          r"half1 and half2 must have the same shape, got in_features=4.* and in_features=5"),
    _case("embedding-count", lambda: PackedEmbedding(0, 4), ValueError,
          r"num_embeddings must be a positive int, got 0"),
    _case("embedding-parts", lambda: PackedEmbedding(5, 4, parts=0), ValueError, r"parts must be 1 or 2, got 0"),
    _case("embedding-dtype", lambda: PackedEmbedding(5, 4, dtype=torch.float64), TypeError,
          r"dtype must be float32, bfloat16 or float16, got torch.float64"),
    _case("from-quant-embedding-type", lambda: PackedEmbedding.from_quant_embedding(nn.Embedding(5, 4)), TypeError,
          r"module must be a triton_bq.QuantEmbedding, got Embedding"),
    _case("from-quant-embedding-fp",
          lambda: PackedEmbedding.from_quant_embedding(QuantEmbedding(5, 4, weight_method=None)), ValueError,
          r"module has weight_method=None: a full-precision table has nothing to pack"),
    _case("embedding-ids", lambda: PackedEmbedding(5, 4)(torch.ones(2)), TypeError,
          r"input_ids must be int32/int64, got dtype torch.float32"),
]

BITPACK_CASES = [
    _case("bits", lambda: bitpack.words_per_row(4, 4), ValueError,
          r"bits must be 1 \(binary\) or 2 \(ternary\), got 4"),
    _case("in-features", lambda: bitpack.words_per_row(-1, 1), ValueError,
          r"in_features must be a positive int, got -1"),
    _case("ternary-values", lambda: bitpack.pack_codes(torch.tensor([[1.0, 2.0]]), 2), ValueError,
          r"ternary codes must be in \{-1, 0, \+1\}, got the value 2\.0"),
    _case("codes-type", lambda: bitpack.pack_codes([1, -1], 1), TypeError, r"codes must be a tensor, got list"),
    _case("codes-complex", lambda: bitpack.pack_codes(torch.ones(2, dtype=torch.complex64), 1), TypeError,
          r"codes must be a real tensor, got dtype torch.complex64"),
    _case("codes-empty", lambda: bitpack.pack_codes(torch.ones(2, 0), 1), ValueError,
          r"codes must have a non-empty last dim, got shape \(2, 0\)"),
    _case("unpack-dtype", lambda: bitpack.unpack_codes(torch.ones(2, 1), 1, 4), TypeError,
          r"data must be an int32 tensor, got torch.float32"),
    _case("unpack-width", lambda: bitpack.unpack_codes(torch.ones(2, 3, dtype=torch.int32), 1, 4), ValueError,
          r"data's last dim must be ceil\(in_features \* bits / 32\) = 1 for in_features=4, bits=1; "
          r"got shape \(2, 3\)"),
    _case("packed-data-dtype", lambda: bitpack.PackedWeight(torch.ones(1, 3, 1), torch.ones(1, 1), 1, 4), TypeError,
          r"data must be an int32 tensor, got torch.float32"),
    _case("packed-scale-dtype",
          lambda: bitpack.PackedWeight(torch.ones(1, 3, 1, dtype=torch.int32), torch.ones(1, 1).long(), 1, 4),
          TypeError, r"scale must be a floating-point tensor, got torch.int64"),
    _case("packed-data-shape",
          lambda: bitpack.PackedWeight(torch.ones(3, 3, 1, dtype=torch.int32), torch.ones(3, 1), 1, 4), ValueError,
          r"data must have shape \[parts \(1 or 2\), out_features, 1\] for in_features=4 and bits=1, got \(3, 3, 1\)"),
    _case("packed-scale-shape",
          lambda: bitpack.PackedWeight(torch.ones(1, 3, 1, dtype=torch.int32), torch.ones(1, 2), 1, 4), ValueError,
          r"scale must have shape \[1, 1\] or \[1, 3\], got \(1, 2\)"),
    _case("packed-scale-device",
          lambda: bitpack.PackedWeight(torch.ones(1, 3, 1, dtype=torch.int32), torch.ones(1, 1, device="meta"), 1, 4),
          ValueError, r"scale is on meta but data is on cpu"),
    _case("weight-dtype", lambda: bitpack.pack_weight(W.long()), TypeError,
          r"weight must be a floating-point tensor, got torch.int64"),
    _case("weight-dim", lambda: bitpack.pack_weight(W.reshape(-1)), ValueError,
          r"weight must be 2-D \[out_features, in_features\], got shape \(12,\)"),
    _case("scale-count", lambda: bitpack.pack_weight(W, "bwn", scale=torch.ones(2)), ValueError,
          r"scale must have 1 or 3 elements, got shape \(2,\)"),
    _case("threshold-with-scale", lambda: bitpack.pack_weight(W, "twn", scale=torch.ones(())), ValueError,
          r"method='twn' needs threshold together with scale"),
    _case("split-shapes", lambda: bitpack.pack_split_binary(W, W[:, :3]), ValueError,
          r"weight1 and weight2 must have the same shape, got \(3, 4\) and \(3, 3\)"),
    _case("packed-bytes", lambda: bitpack.packed_bytes(-1, 4, 1), ValueError,
          r"rows, columns must be >= 0 and bits >= 1, got rows=-1, columns=4, bits=1"),
    _case("weight-bits", lambda: bitpack.weight_bits("int4"), ValueError,
          r"weight_method must be one of .*, got 'int4'"),
    _case("method", lambda: bitpack.pack_weight(W, "int4"), ValueError, r"method must be one of .*, got 'int4'"),
]

DISTILL_CASES = [
    _case("pair-count", lambda: distill.hidden_states_loss([X], [X, X]), ValueError,
          r"hidden_states: student and teacher must give the same non-zero number of tensors, got 1 and 2"),
    _case("pair-shape", lambda: distill.hidden_states_loss([X], [W]), ValueError,
          r"hidden_states\[0\]: student shape \(2, 4\) != teacher shape \(3, 4\)"),
    _case("mask-shape", lambda: distill.hidden_states_loss([X[None]], [X[None]], torch.ones(1, 5), mask_padding=True),
          ValueError, r"attention_mask must have shape \(1, 2\) for hidden states, got \(1, 5\)"),
    _case("hidden-mask-padding", lambda: distill.hidden_states_loss([X], [X], mask_padding=True), ValueError,
          r"mask_padding=True needs attention_mask"),
    _case("scores-mask-padding",
          lambda: distill.attention_scores_loss([torch.ones(1, 1, 2, 2)], [torch.ones(1, 1, 2, 2)], mask_padding=True),
          ValueError, r"mask_padding=True needs attention_mask"),
    _case("scores-shape", lambda: distill.attention_scores_loss([X], [X]), ValueError,
          r"attention scores must be \[B, heads, S, S\], got shape \(2, 4\)"),
    _case("soft-ce-shape", lambda: distill.soft_cross_entropy(X, W), ValueError,
          r"student logits shape \(2, 4\) != teacher logits shape \(3, 4\)"),
    _case("soft-ce-temperature", lambda: distill.soft_cross_entropy(X, X, temperature=0.0), ValueError,
          r"temperature must be > 0, got 0\.0"),
    _case("regression-shape", lambda: distill.logits_loss(torch.ones(3), torch.ones(4)), ValueError,
          r"student logits shape \(3,\) != teacher logits shape \(4,\)"),
    _case("outputs-field", lambda: distill.distill_loss({"logits": X}, {"logits": X}, logits_weight=0.0,
                                                         attention_weight=0.0), ValueError,
          r"model outputs have no 'hidden_states'"),
    _case("scores-missing", lambda: distill.distill_loss({"logits": X}, {"logits": X}, hidden_weight=0.0), ValueError,
          r"attention_weight != 0 needs student_scores and teacher_scores"),
    _case("all-zero", lambda: distill.distill_loss({"logits": X}, {"logits": X}, hidden_weight=0.0,
                                                    attention_weight=0.0, logits_weight=0.0), ValueError,
          r"at least one of hidden_weight, attention_weight, logits_weight must be non-zero"),
    _case("module-all-zero", lambda: distill.DistillationLoss(hidden_weight=0.0, attention_weight=0.0,
                                                              logits_weight=0.0), ValueError,
          r"at least one of hidden_weight, attention_weight, logits_weight must be non-zero"),
    _case("module-temperature", lambda: distill.DistillationLoss(temperature=-1.0), ValueError,
          r"temperature must be > 0, got -1\.0"),
    _case("record-none", lambda: distill.record_attention_scores(nn.Sequential(nn.Linear(2, 2))), ValueError,
          r"model has no BERT-style self-attention to record \(Sequential\)"),
]


def _closed_recorder_scores():
    recorder = distill.capture_attention_scores(tiny_bert(0))
    recorder.close()
    return recorder.scores


def _unrun_recorder_scores():
    with distill.capture_attention_scores(tiny_bert(0)) as recorder:
        return recorder.scores


DISTILL_CASES += [
    _case("recorder-closed", _closed_recorder_scores, RuntimeError, r"the attention score recorder is closed"),
    _case("recorder-unrun", _unrun_recorder_scores, RuntimeError,
          r"no scores recorded yet for attention module\(s\) \[0, 1\]: run a forward first"),
]

TWS_CASES = [
    _case("method", lambda: tws.split_ternary_weight(W, method="bwn"), ValueError,
          r"method must be one of \('twn', 'lat'\), got 'bwn'"),
    _case("scale-alone", lambda: tws.split_ternary_weight(W, scale=torch.tensor(0.5)), ValueError,
          r"scale and threshold must be given together \(or neither\)"),
    _case("weight-dtype", lambda: tws.split_ternary_weight(W.long()), TypeError,
          r"weight must be a floating-point tensor, got torch.int64"),
    _case("granularity", lambda: tws.split_ternary_weight(W, "col"), ValueError,
          r"granularity must be one of \('tensor', 'row'\), got 'col'"),
    _case("row-2d", lambda: tws.split_ternary_weight(torch.ones(2, 2, 2), "row"), ValueError,
          r"granularity='row' needs a 2-D weight, got shape \(2, 2, 2\)"),
    _case("scale-count", lambda: tws.split_ternary_weight(W, "row", scale=torch.ones(2), threshold=torch.ones(2)),
          ValueError,
          r"scale must have 3 element\(s\) for granularity='row' and weight shape \(3, 4\), got shape \(2,\)"),
    _case("no-exact-split",
          lambda: tws.split_ternary_weight(W, scale=torch.tensor(0.01), threshold=torch.tensor(0.5)), ValueError,
          r"no exact solution for 1 scale group\(s\); first: the tensor with a=0\.5 \(needs 0 < a < 1\), b=-"),
    _case("model-type", lambda: tws.split_ternary_to_binary("bert"), TypeError, r"model must be an nn.Module, got str"),
    _case("no-ternary-layer", lambda: tws.split_ternary_to_binary(nn.Sequential(nn.Linear(2, 2))), ValueError,
          r"split_ternary_to_binary: Sequential has no ternary layer \(TernaryLinear, ternary QuantConv1D or "
          r"QuantEmbedding\) to split; its quantized layers: none"),
    _case("include-string",
          lambda: tws.split_ternary_to_binary(nn.Sequential(triton_bq.TernaryLinear(2, 2)), include="query"), TypeError,
          r"include must be an iterable of names, not a string, got 'query'"),
    _case("include-unknown",
          lambda: tws.split_ternary_to_binary(nn.Sequential(triton_bq.TernaryLinear(2, 2)), include=["nothing"]),
          ValueError, r"include names 'nothing', which is neither a ternary module nor a split candidate"),
]

SIZE_CASES = [
    _case("model-type", lambda: size.model_size_report("bert"), TypeError, r"model must be an nn.Module, got str"),
    _case("unit", lambda: size.model_size_report(nn.Linear(2, 2)).table("GB"), ValueError,
          r"unit must be one of .*, got 'GB'"),
]

PACKED_LINEAR_CASES = [
    _case("packed-type", lambda: ops.packed_linear(X, W), TypeError,
          r"packed must be a triton_bq.bitpack.PackedWeight, got Tensor"),
    _case("x-type", lambda: ops.packed_linear([1.0], _packed()), TypeError, r"x must be a tensor, got list"),
    _case("x-dtype", lambda: ops.packed_linear(X.double(), _packed()), TypeError,
          r"x must be float32, bfloat16, float16 or int8, got dtype torch.float64"),
    _case("x-width", lambda: ops.packed_linear(X[:, :3], _packed()), ValueError,
          r"x's last dim must be in_features=4, got shape \(2, 3\)"),
    _case("act-quant", lambda: ops.packed_linear(X, _packed(), act_quant="per_row"), ValueError,
          r"act_quant must be one of \(None, 'per_token', 'per_tensor'\), got 'per_row'"),
    _case("act-quant-with-int8", lambda: ops.packed_linear(X, _packed(), x_scale=torch.ones(2), act_quant="per_token"),
          ValueError, r"act_quant quantizes float x itself: pass neither int8 x nor x_scale with it"),
    _case("int8-without-scale", lambda: ops.packed_linear(X.to(torch.int8), _packed()), ValueError,
          r"int8 x needs x_scale \(the activation scale: one value, or one per row\)"),
    _case("x-scale-type", lambda: ops.packed_linear(X.to(torch.int8), _packed(), x_scale=2.0), TypeError,
          r"x_scale must be a tensor, got float"),
    _case("x-scale-count", lambda: ops.packed_linear(X.to(torch.int8), _packed(), x_scale=torch.ones(3)), ValueError,
          r"x_scale must have 1 or 2 elements \(x.shape\[:-1\]\), got shape \(3,\)"),
]


def _fused(weight=W, x=X, options=None, **tensors):
    return fused_quant_linear(x, weight, None, QuantOptions() if options is None else options, **tensors)


def _fused_with_bias(bias):
    return fused_quant_linear(X, W, bias, QuantOptions())


def _kernel_check(name, tensor):
    _common.check_kernel_tensor(name, tensor)


def _device_scales(*args, **kwargs):
    return scales.weight_scale_threshold(*args, **kwargs)


def _device_act_params(*args, **kwargs):
    return scales.act_params(*args, **kwargs)


KERNEL_CASES = [
    _case("kernel-dtype", lambda: _kernel_check("weight", W.double()), TypeError,
          r"weight must have dtype in \(.*\) for the Triton kernels, got torch.float64"),
    _case("kernel-offsets", lambda: _kernel_check("x", torch.empty(2**31, device="meta")), ValueError,
          r"x has 2147483648 elements; the kernels use 32-bit offsets"),
    _case("fused-options", lambda: _fused(options="bwn"), TypeError,
          r"options must be a triton_bq.QuantOptions, got str"),
    _case("fused-scale-type", lambda: _fused(weight_scale=0.5), TypeError, r"weight_scale must be a tensor, got float"),
    _case("fused-scale-count", lambda: _fused(weight_scale=torch.ones(2)), ValueError,
          r"weight_scale must have 1 or out_features=3 elements, got shape \(2,\)"),
    _case("fused-scale-alone", lambda: _fused(options=QuantOptions("twn"), weight_scale=torch.ones(())), ValueError,
          r"weight_scale and weight_threshold must be given together for weight_method='twn'"),
    _case("fused-device", lambda: _fused(weight=W.to("meta")), ValueError,
          r"x and weight must be on the same device, got cpu and meta"),
    _case("fused-bias-device", lambda: _fused_with_bias(torch.ones(3, device="meta")), ValueError,
          r"bias must be on cpu like weight, got meta"),
    _case("scales-shape", lambda: _device_scales(W.reshape(-1), "bwn"), ValueError,
          r"weight must be a non-empty 2-D tensor, got shape \(12,\)"),
    _case("scales-granularity", lambda: _device_scales(W, "bwn", "col"), ValueError,
          r"granularity must be one of \('tensor', 'row'\), got 'col'"),
    _case("scales-method", lambda: _device_scales(W, "lat"), ValueError,
          r"weight_method must be 'bwn' or 'twn' to compute scales on the device, got 'lat'"),
    _case("act-params-step", lambda: _device_act_params(X, "lsq", 4, step=torch.ones(2)), ValueError,
          r"act_method='lsq' needs a one-element act_step, got tensor\(\[1\., 1\.\]\)"),
    _case("act-params-clip", lambda: _device_act_params(X, "sym", 8), ValueError,
          r"act_method='sym' needs act_clip with 2 elements \(lo, hi\), got None"),
    _case("act-params-x", lambda: _device_act_params(X[None], "sym", 8, clip=torch.tensor([-1.0, 1.0])), ValueError,
          r"x must be 2-D \[tokens, features\] here, got shape \(1, 2, 4\)"),
]


def _ternary_model():
    return triton_bq.quantize_(nn.Sequential(nn.Linear(4, 3)), QuantConfig(weight_method="twn", act_bits=None))


ADAPTIVE_CASES = [
    _case("extra-bytes", lambda: adaptive.split_extra_bytes(BinaryLinear(4, 3)), TypeError,
          r"module must be a ternary QuantLinear or QuantEmbedding, got BinaryLinear"),
    _case("costs-name", lambda: adaptive.split_costs(_ternary_model(), {"group": ["1"]}), ValueError,
          r"candidate 'group' names '1', which is not a ternary module of this model"),
    _case("keys", lambda: adaptive.choose_splits({"a": 1.0}, {"b": 4}, 8), ValueError,
          r"sensitivities and sizes must have the same keys; only in sensitivities: \['a'\]"),
    _case("budget-type", lambda: adaptive.choose_splits({"a": 1.0}, {"a": 4}, 8.0), TypeError,
          r"budget must be an int \(bytes\), got float"),
    _case("budget-negative", lambda: adaptive.choose_splits({"a": 1.0}, {"a": 4}, -1), ValueError,
          r"budget must be >= 0, got -1"),
    _case("unit", lambda: adaptive.choose_splits({"a": 1.0}, {"a": 4}, 8, unit=0), ValueError,
          r"unit must be None or a positive int, got 0"),
    _case("size-type", lambda: adaptive.choose_splits({"a": 1.0}, {"a": 4.5}, 8), TypeError,
          r"sizes\['a'\] must be an int \(bytes\), got float"),
    _case("size-negative", lambda: adaptive.choose_splits({"a": 1.0}, {"a": -4}, 8), ValueError,
          r"sizes\['a'\] must be >= 0, got -4"),
    _case("sensitivity", lambda: adaptive.choose_splits({"a": float("nan")}, {"a": 4}, 8), ValueError,
          r"sensitivities\['a'\] must be finite, got nan"),
    _case("cells", lambda: adaptive.choose_splits({"a": 1.0, "b": 1.0}, {"a": 1, "b": 3}, 100, max_cells=10),
          ValueError, r"the knapsack table would have 2 x 101 cells \(> max_cells=10\)"),
]

WIDTH_CASES = [
    _case("width", lambda: width.width_plan(tiny_bert(0), 1.5), ValueError,
          r"width must be a number in \(0, 1\], got 1\.5"),
    _case("no-layers", lambda: width.taylor_importance(nn.Linear(2, 2), []), ValueError,
          r"model has no BERT-style layers to rank \(Linear\)"),
    _case("no-batches", lambda: width.taylor_importance(tiny_bert(0), []), ValueError,
          r"batches is empty: taylor_importance needs at least one batch"),
    _case("not-whole", lambda: width.width_plan(tiny_bert(0), 0.3), ValueError,
          r"width=0\.3 does not apply to BertForSequenceClassification"),
    _case("importance-layers", lambda: width.width_plan(tiny_bert(0), 0.5, importance={"layer": {}}), ValueError,
          r"importance names layers \['layer'\], the model has \['bert.encoder.layer.0', 'bert.encoder.layer.1'\]"),
    _case("importance-shapes", lambda: width.width_plan(tiny_bert(0), 0.5, importance={
        f"bert.encoder.layer.{i}": {"heads": torch.ones(3), "neurons": torch.ones(48)} for i in range(2)}), ValueError,
          r"importance\['bert.encoder.layer.0'\] must hold 4 head and 48 neuron values, got \(3,\) and \(48,\)"),
    _case("plan-indices", lambda: width.shrink_width_(tiny_bert(0), {
        f"bert.encoder.layer.{i}": {"heads": [0, 0], "neurons": list(range(24))} for i in range(2)}), ValueError,
          r"plan\['bert.encoder.layer.0'\]\['heads'\] must be distinct indices in \[0, 4\), got \[0, 0\]"),
    _case("plan-layers", lambda: width.shrink_width_(tiny_bert(0), {"layer": {}}), ValueError,
          r"the plan names layers \['layer'\], the model has \['bert.encoder.layer.0', 'bert.encoder.layer.1'\]"),
    _case("kept-heads", lambda: width.kept_heads(tiny_bert(0), {"layer": {}}), ValueError,
          r"the plan names layers \['layer'\], the model has \['bert.encoder.layer.0', 'bert.encoder.layer.1'\]"),
]

EXPORT_CASES = [
    _case("save-type", lambda: triton_bq.save_packed("bert", "unused"), TypeError,
          r"model must be an nn.Module, got str"),
    _case("pack-type", lambda: triton_bq.pack_model("bert"), TypeError, r"model must be an nn.Module, got str"),
]


def _matmul(x=None, data=None, scale=None, bias=None, **kwargs):
    packed = _packed()
    arguments = dict(bits=1, in_features=4)
    arguments.update(kwargs)
    return pm.packed_matmul(X if x is None else x, packed.data if data is None else data,
                            packed.scale if scale is None else scale, bias, **arguments)


def _matmul_config(kernel, **changes):
    return dict(pm.default_config(2, 3, 4, 1, kernel=kernel, target=configs.TARGETS["sm_90"]), **changes)


def _default_config(*args, **kwargs):
    return pm.default_config(*args, **kwargs)


def _quantize_int8(x):
    return pm.quantize_int8(x)


PACKED_MATMUL_CASES = [
    _case("gemv-m", lambda: _default_config(17, 33, 100, 1, kernel="gemv"), ValueError,
          r"the gemv kernel takes M <= 16, got M=17"),
    _case("kernel", lambda: _default_config(1, 33, 100, 1, kernel="dense"), ValueError,
          r"kernel must be 'auto', 'gemv' or 'gemm', got 'dense'"),
    _case("config-block-m", lambda: _matmul(config=_matmul_config("gemv", BLOCK_M=1)), ValueError,
          r"config BLOCK_M=1 is smaller than M=2 \(the gemv holds all rows\)"),
    _case("config-block-k", lambda: _matmul(config=_matmul_config("gemm", BLOCK_K=40)), ValueError,
          r"config BLOCK_K=40 must be a multiple of 32 for bits=1"),
    _case("config-split-k", lambda: _matmul(config=_matmul_config("gemm", SPLIT_K=0)), ValueError,
          r"config SPLIT_K must be a positive int, got 0"),
    _case("x-type", lambda: _matmul(x=[1.0]), TypeError, r"x must be a tensor, got list"),
    _case("x-dtype", lambda: _matmul(x=X.double()), TypeError,
          r"x must be float32, bfloat16, float16 or int8, got dtype torch.float64"),
    _case("data-dtype", lambda: _matmul(data=torch.ones(1, 3, 1)), TypeError,
          r"data must be int32 packed words, got dtype torch.float32"),
    _case("scale-dtype", lambda: _matmul(scale=torch.ones(1, 1, dtype=torch.long)), TypeError,
          r"scale must be a floating-point tensor, got dtype torch.int64"),
    _case("bits", lambda: _matmul(bits=3), ValueError, r"bits must be 1 or 2, got 3"),
    _case("x-shape", lambda: _matmul(x=X[:, :3]), ValueError,
          r"x must be 2-D \[M, in_features=4\], got shape \(2, 3\)"),
    _case("data-shape", lambda: _matmul(data=torch.ones(1, 3, 2, dtype=torch.int32)), ValueError,
          r"data must be \[parts \(1 or 2\), N, 1\], got shape \(1, 3, 2\)"),
    _case("data-strides", lambda: _matmul(data=torch.ones(1, 3, 2, dtype=torch.int32)[:, :, ::2]), ValueError,
          r"data must be contiguous along its last dim, got strides \(6, 2, 2\)"),
    _case("scale-shape", lambda: _matmul(scale=torch.ones(1, 2)), ValueError,
          r"scale must be \[1, 1\] or \[1, 3\], got shape \(1, 2\)"),
    _case("bias-dtype", lambda: _matmul(bias=torch.ones(3, dtype=torch.long)), TypeError,
          r"bias must be a floating-point tensor, got torch.int64"),
    _case("bias-shape", lambda: _matmul(bias=torch.ones(4)), ValueError, r"bias must have shape \(3,\), got \(4,\)"),
    _case("x-scale-dtype", lambda: _matmul(x=X.to(torch.int8), x_scale=torch.ones(2, dtype=torch.long)), TypeError,
          r"x_scale must be a floating-point tensor, got torch.int64"),
    _case("x-scale-count", lambda: _matmul(x=X.to(torch.int8), x_scale=torch.ones(3)), ValueError,
          r"x_scale must have 1 or M=2 elements, got shape \(3,\)"),
    _case("int8-scale", lambda: _matmul(x=X.to(torch.int8)), ValueError,
          r"int8 x needs x_scale \(the activation scale: one value, or one per row\)"),
    _case("device", lambda: _matmul(bias=torch.ones(3, device="meta")), ValueError, r"bias is on meta but x is on cpu"),
    _case("out-dtype", lambda: _matmul(out_dtype=torch.float64), TypeError,
          r"out_dtype must be float32, bfloat16 or float16, got torch.float64"),
    _case("out-shape", lambda: _matmul(out=torch.empty(3, 3)), ValueError,
          r"out must be a \[2, 3\] torch.float32 tensor on cpu, got \(3, 3\) torch.float32 on cpu"),
    _case("int8-input", lambda: _quantize_int8(X.long()), TypeError,
          r"x must be a float32, bfloat16 or float16 tensor, got torch.int64"),
    _case("int8-shape", lambda: _quantize_int8(X[0]), ValueError, r"x must be 2-D \[M, K\], got shape \(4,\)"),
]


TABLES = {"options": OPTIONS_CASES, "reference": REFERENCE_CASES, "convert": CONVERT_CASES, "nn": NN_CASES,
          "ops": OPS_CASES, "packed": PACKED_CASES, "bitpack": BITPACK_CASES, "distill": DISTILL_CASES,
          "tws": TWS_CASES, "size": SIZE_CASES, "packed_linear": PACKED_LINEAR_CASES, "kernels": KERNEL_CASES,
          "adaptive": ADAPTIVE_CASES, "width": WIDTH_CASES, "export": EXPORT_CASES,
          "packed_matmul": PACKED_MATMUL_CASES}


@pytest.mark.parametrize("call, error, match", [case for table in TABLES.values() for case in table])
def test_bad_argument_is_named_with_its_value(call, error, match):
    _check(call, error, match)


def test_every_table_row_matches_more_than_a_fragment():
    # A match must say which argument and what was wrong: at least a few words, not "shape" or "16".
    for table in TABLES.values():
        for case in table:
            assert len(re.sub(r"\\.", "", case.values[2])) >= 20, case.id


def _write_manifest(directory, **fields):
    # Version 1 (no file checksums) reaches the checks after the file list; test_packed_integrity covers version 2.
    manifest = dict(format=FORMAT, version=1, architecture="BertForSequenceClassification", config=None,
                    modules={}, sizes={})
    manifest.update(fields)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    safetensors.torch.save_file({}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("fields, model_or_config, error, match", [
    (dict(format="onnx", version=1), None, ValueError, r"packed.json is not a .* manifest: format='onnx', version=1"),
    (dict(architecture="NoSuchModel"), None, ValueError,
     r"cannot build architecture 'NoSuchModel' from transformers: pass the full-precision model"),
    (dict(), None, ValueError, r"the manifest has no config: pass model_or_config"),
    (dict(), {"hidden_size": 32}, TypeError,
     r"model_or_config must be an nn.Module, a PretrainedConfig or None, got dict"),
    (dict(modules={"classifier": {"type": "Conv"}}), tiny_bert(0), ValueError,
     r"unknown module type 'Conv' for 'classifier' in .*packed.json"),
], ids=["format", "architecture", "no-config", "config-type", "module-type"])
def test_load_packed_rejects_bad_manifests(tmp_path, fields, model_or_config, error, match):
    _write_manifest(tmp_path, **fields)
    with pytest.raises(error, match=match):
        triton_bq.load_packed(tmp_path, model_or_config)


def test_kernels_outside_the_interpreter_need_cuda_tensors(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match=r"the Triton kernels need CUDA tensors .*, got x on cpu"):
        _common.check_kernel_tensor("x", X)


def test_to_packed_hook_must_return_a_packed_module():
    class Custom(nn.Module):
        def to_packed(self):
            return nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"Custom.to_packed\(\) must return a PackedLinear, PackedSplitLinear or "
                                        r"PackedEmbedding, got Linear"):
        export_format.pack_model(nn.Sequential(Custom()))
