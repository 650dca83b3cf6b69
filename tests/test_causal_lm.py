"""Quantized causal LMs stay causal with per-token activation scales (the default for them), tiny random-init
Llama and GPT-2 from transformers configs: a prefix's logits equal the full sequence's first positions, a sample's
logits do not depend on the rest of the batch, and greedy ``generate()`` gives the same tokens with and without the
KV cache. Per-tensor scales on a causal LM warn (and break all three)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import triton_bq
from triton_bq.arch import is_causal_lm

TOLERANCE = 1e-6  # |logit difference|; full precision gives ~1e-7 (different GEMM shapes, softmax lengths)


def tiny_llama(layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids(batch, length, seed=1):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def causal_gaps(model) -> tuple[float, float]:
    """(prefix gap, batch gap): max |logit difference| of a prefix against the full sequence's first positions,
    and of one sample alone against the same sample inside a batch of three."""
    ids = _ids(3, 10)
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :6]).logits
        alone = model(ids[:1]).logits
    return (prefix - full[:, :6]).abs().max().item(), (alone - full[:1]).abs().max().item()


def same_generation(model) -> bool:
    ids = _ids(1, 4, seed=2)
    outputs = [
        model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)
        for use_cache in (True, False)
    ]
    return torch.equal(outputs[0], outputs[1])


def test_causal_lm_detection():
    assert is_causal_lm(tiny_llama()) and is_causal_lm(tiny_gpt2())
    assert not is_causal_lm(transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))
    assert not is_causal_lm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "backend, act_bits", [("reference", 8), ("reference", 4), ("triton", 8)],
    ids=["reference-a8", "reference-a4", "triton-a8"],
)
def test_quantized_llama_is_causal_and_batch_independent(backend, act_bits):
    # The interpreted kernels are slow on the CPU: one layer and no generate() there (the reference covers it).
    model = tiny_llama(layers=2 if backend == "reference" else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-family default must not warn
        triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="twn", act_bits=act_bits, backend=backend))
    quantized = [module for module in model.modules() if isinstance(module, triton_bq.QuantLinear)]
    assert len(quantized) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down; lm_head kept
    method = "sym" if act_bits == 8 else "lsq"
    assert all(module.act_quantizer.method == method for module in quantized)
    assert all(module.act_quantizer.granularity == "per_token" for module in quantized)
    with torch.no_grad():
        model(_ids(2, 6))  # initializes the LSQ steps (4 bits)
    if backend == "reference":
        # float64: the batched and single-sample GEMMs round differently, and a float32 difference at a rounding tie
        # flips an activation code (one step, far above the tolerance) without any mixing of tokens or samples.
        model.double()
    prefix_gap, batch_gap = causal_gaps(model)
    assert prefix_gap <= TOLERANCE and batch_gap <= TOLERANCE, (prefix_gap, batch_gap)
    if backend == "reference":
        assert same_generation(model)


def test_per_tensor_on_a_causal_lm_warns_and_is_not_causal():
    model = tiny_llama()
    with pytest.warns(UserWarning, match="per_tensor.*causal LM"):
        triton_bq.quantize_(model, triton_bq.QuantConfig(act_granularity="per_tensor", backend="reference"))
    prefix_gap, batch_gap = causal_gaps(model)
    # A prefix can share the full sequence's largest activations (then its scales); other samples change them.
    assert max(prefix_gap, batch_gap) > 100 * TOLERANCE, (prefix_gap, batch_gap)


def test_quantized_gpt2_is_causal():
    """GPT-2's projections are ``Conv1D`` (not quantized here): its word embedding is, per row."""
    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_bq.quantize_(model, triton_bq.QuantConfig(weight_method="bwn", act_bits=8))
    assert isinstance(model.get_input_embeddings(), triton_bq.QuantEmbedding)
    for module in model.modules():
        if isinstance(module, triton_bq.QuantLinear) and module.act_quantizer is not None:
            assert module.act_quantizer.granularity == "per_token"
    prefix_gap, batch_gap = causal_gaps(model)
    assert prefix_gap <= TOLERANCE and batch_gap <= TOLERANCE, (prefix_gap, batch_gap)
    assert same_generation(model)


def test_encoders_keep_per_tensor():
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    triton_bq.quantize_(model, triton_bq.QuantConfig())
    layers = [module for module in model.modules() if isinstance(module, triton_bq.QuantLinear)]
    assert layers and all(module.act_quantizer.granularity == "per_tensor" for module in layers)
