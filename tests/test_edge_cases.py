"""Edge cases on the reference backend: empty batches, LSQ initialisation, non-finite weights and inputs."""

import pytest
import torch
from tiny_bert import bert_inputs, tiny_bert

import triton_bq
from triton_bq import reference
from triton_bq.nn.attention import quantized_attention_forward


@pytest.mark.parametrize("bits, method", [(8, "sym"), (8, "asym"), (4, "lsq")])
def test_empty_batch_gives_empty_output_and_zero_grads(bits, method):
    torch.manual_seed(0)
    layer = triton_bq.TernaryLinear(16, 8, act_bits=bits, act_method=method, backend="reference")
    x = torch.randn(0, 5, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    quantizer = layer.act_quantizer
    learned = quantizer.step if method == "lsq" else quantizer.clip
    assert learned.grad is None or torch.equal(learned.grad, torch.zeros_like(learned))
    if method == "lsq":
        assert not bool(quantizer.initialized) and quantizer.step.item() == 1.0
        x = torch.randn(4, 16)
        layer(x)
        assert bool(quantizer.initialized)
        assert quantizer.step.item() == pytest.approx(reference.lsq_init_step(x, 4).item())


def test_lsq_backward_on_an_empty_tensor():
    step = torch.tensor(0.1, requires_grad=True)
    x = torch.empty(0, 3, requires_grad=True)
    reference.quantize_act(x, "lsq", 4, step=step).sum().backward()
    assert step.grad.item() == 0.0
    with pytest.raises(ValueError, match="empty"):
        reference.lsq_init_step(x, 4)


def test_empty_batch_through_quantized_attention():
    # Hugging Face's own head reshapes (view(..., -1, head_dim)) reject 0-token batches, so call the attention
    # function directly with [0, heads, length, head_dim] tensors.
    model = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig("twn", act_bits=4, backend="reference"))
    attention = model.bert.encoder.layer[0].attention.self
    query, key, value = (torch.empty(0, 4, 6, 8, requires_grad=True) for _ in range(3))
    output, probs = quantized_attention_forward(attention, query, key, value, None, scaling=8**-0.5)
    assert output.shape == (0, 6, 4, 8) and probs.shape == (0, 4, 6, 6)
    output.sum().backward()
    assert query.grad.shape == query.shape
    lsq = [getattr(attention, f"{part}_quantizer") for part in ("query", "key", "value", "probs")]
    assert all(m.method in ("lsq", "asym_lsq") and not bool(m.initialized) for m in lsq)


@pytest.mark.parametrize("method", ["bwn", "twn"])
def test_non_finite_latent_weight_raises_naming_the_layer(method):
    model = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig(method, backend="reference"))
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense.*1 non-finite"):
        model(**bert_inputs())
    model.bert.encoder.layer[1].intermediate.dense.check_finite = False
    with torch.no_grad():
        assert model(**bert_inputs()).logits.shape == (3, 2)


def test_non_finite_embedding_row_raises_when_looked_up():
    model = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig("twn", backend="reference"))
    inputs = bert_inputs()
    unused = sorted(set(range(64)) - set(inputs["input_ids"].flatten().tolist()))[0]
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[unused, 0] = float("inf")
        model(**inputs)
        inputs["input_ids"][0, 0] = unused
        with pytest.raises(ValueError, match=r"bert\.embeddings\.word_embeddings"):
            model(**inputs)


def test_nan_and_inf_in_x_propagate_on_the_reference_backend():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    weight_only = triton_bq.BinaryLinear(16, 8, backend="reference")
    y = weight_only(x)
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any() and torch.isfinite(y[[0, 3]]).all()
    lsq = triton_bq.BinaryLinear(16, 8, act_bits=4, backend="reference")
    lsq.act_quantizer.step.data.fill_(0.1)
    lsq.act_quantizer.initialized.fill_(True)
    y = lsq(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()  # LSQ clips inf to its range
    # A per-tensor max-abs scale over a NaN is NaN: every output of the tensor is NaN, never finite garbage.
    sym = triton_bq.BinaryLinear(16, 8, act_bits=8, backend="reference")
    assert torch.isnan(sym(x)).all()
