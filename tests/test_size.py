"""True model size: hand-computed byte counts on a tiny BERT (ternary, split, binary, fp32) and on BERT-base."""

import pytest
import torch
import transformers
from tiny_bert import CONFIG, tiny_bert
from torch import nn

import triton_bq
from triton_bq.bitpack import packed_bytes, weight_bits
from triton_bq.export.io import save_packed
from triton_bq.export.size import SizeReport, model_size_report, model_size_report_from_config, packed_size_bytes
from triton_bq.recipe.adaptive import split_extra_bytes
from triton_bq.recipe.tws import split_ternary_to_binary


def ternary_tiny(granularity="tensor", act_bits=8):
    config = triton_bq.QuantConfig(weight_method="twn", granularity=granularity, act_bits=act_bits, backend="reference")
    return triton_bq.quantize_(tiny_bert(), config)


# Tiny BERT by hand: per layer Q, K, V, O 32x32, FFN 32x48 and 48x32; pooler 32x32; word embedding 64x32.
QUANTIZED_NUMEL = 2 * (4 * 32 * 32 + 2 * 32 * 48) + 32 * 32 + 64 * 32  # 17,408
LINEARS = 2 * 6 + 1  # quantized Linear layers
FP32_EMBEDDING_NUMEL = 32 * 32 + 2 * 32  # position + token type
BIAS_NUMEL = 2 * (4 * 32 + 48 + 32) + 32 + 2  # layers, pooler, classifier
NORM_NUMEL = 2 * 32 + 2 * 2 * 2 * 32  # embedding LayerNorm + 2 per layer (weight and bias each)
HEAD_NUMEL = 2 * 32
ACT_NUMEL_A8 = LINEARS * 2 + 2 * 4 * 2  # a clip pair per Linear input, 4 clip pairs per attention
# Rows are packed into whole int32 words: at 1 bit, each FFN output matrix (32 rows of 48 weights) pads 16 bits a row.
BINARY_PADDING = 2 * 32 * 2


def components(report):
    return {name: row["stored_bytes"] for name, row in report.components().items()}


def test_ternary_tiny_bert_by_hand():
    report = model_size_report(ternary_tiny())
    assert components(report) == {
        "ternary weights": QUANTIZED_NUMEL * 2 // 8,
        "weight scales": 4 * (LINEARS + 64),
        "fp32 linear weights": 4 * HEAD_NUMEL,
        "fp32 embeddings": 4 * FP32_EMBEDDING_NUMEL,
        "biases": 4 * BIAS_NUMEL,
        "normalization": 4 * NORM_NUMEL,
        "activation quantizers": 4 * ACT_NUMEL_A8,
    }
    assert report.stored_bytes == 12_516
    all_numel = QUANTIZED_NUMEL + FP32_EMBEDDING_NUMEL + BIAS_NUMEL + NORM_NUMEL + HEAD_NUMEL + ACT_NUMEL_A8
    assert report.fp32_bytes == 4 * all_numel == 4 * sum(p.numel() for p in ternary_tiny().parameters())
    assert report.ratio == pytest.approx(report.fp32_bytes / 12_516)


def test_split_tiny_bert_counts_two_binary_matrices_one_bias_and_one_act_quantizer():
    report = model_size_report(split_ternary_to_binary(ternary_tiny()))
    split_bias_numel = 2 * (4 * 32 + 48 + 32) + 32
    assert components(report) == {
        "binary weights": 2 * (QUANTIZED_NUMEL // 8 + BINARY_PADDING),
        "weight scales": 2 * 4 * (LINEARS + 64),
        "fp32 linear weights": 4 * HEAD_NUMEL,
        "fp32 embeddings": 4 * FP32_EMBEDDING_NUMEL,
        "biases": 4 * BIAS_NUMEL,
        "normalization": 4 * NORM_NUMEL,
        "activation quantizers": 4 * ACT_NUMEL_A8,
    }
    assert report.components()["biases"]["fp32_bytes"] == 4 * (BIAS_NUMEL + split_bias_numel)
    assert report.components()["activation quantizers"]["fp32_bytes"] == 4 * (ACT_NUMEL_A8 + LINEARS * 2)
    assert report.stored_bytes == 13_080
    assert report.fp32_bytes == 4 * sum(p.numel() for p in split_ternary_to_binary(ternary_tiny()).parameters())


@pytest.mark.parametrize("case", ["fp32", "ternary", "split", "split-diverged", "binary-a4-row", "partial-split"])
def test_stored_bytes_are_the_packed_export_payload(case, tmp_path):
    """The report and ``save_packed`` agree to the byte: one size convention for the library."""
    from safetensors import safe_open


    if case == "fp32":
        model = tiny_bert()
    elif case == "binary-a4-row":
        config = triton_bq.QuantConfig(weight_method="bwn", granularity="row", act_bits=4, backend="reference")
        model = triton_bq.quantize_(tiny_bert(), config)
    else:
        model = ternary_tiny()
    if case in ("split", "split-diverged"):
        split_ternary_to_binary(model)
    if case == "partial-split":
        split_ternary_to_binary(model, include=["bert.encoder.layer.0:ffn_in"])
    if case == "split-diverged":
        # Halves whose input clips drifted apart in training are exported with both activation quantizers.
        with torch.no_grad():
            model.bert.encoder.layer[1].output.dense.half2.act_quantizer.clip.mul_(1.5)
    stored = model_size_report(model).stored_bytes
    save_packed(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        payload = sum(handle.get_tensor(key).numel() * handle.get_tensor(key).element_size() for key in handle.keys())
    assert stored == packed_size_bytes(model) == payload


def test_binary_row_granularity_and_full_precision_models():
    binary = triton_bq.quantize_(tiny_bert(), triton_bq.QuantConfig(weight_method="bwn", granularity="row",
                                                                    act_bits=None, backend="reference"))
    report = components(model_size_report(binary))
    assert report["binary weights"] == QUANTIZED_NUMEL // 8 + BINARY_PADDING
    assert report["weight scales"] == 4 * (2 * (4 * 32 + 48 + 32) + 32 + 64)
    assert "activation quantizers" not in report
    fp = model_size_report(tiny_bert())
    assert fp.stored_bytes == fp.fp32_bytes == 4 * sum(p.numel() for p in tiny_bert().parameters())
    assert set(fp.components()) == {"fp32 linear weights", "fp32 embeddings", "biases", "normalization"}


def test_packing_rounds_up_per_row_and_counts_shared_parameters_once():
    assert packed_bytes(1, 16, 2) == 4 and packed_bytes(1, 17, 2) == 8 and packed_bytes(3, 33, 1) == 24
    assert packed_bytes(5, 3, 2) == 20 and packed_bytes(768, 3072, 1) == 768 * 3072 // 8
    assert [weight_bits(method) for method in ("bwn", "twn", "lat", None)] == [1, 2, 2, 32]
    ternary = triton_bq.TernaryLinear(3, 5, bias=False)
    shared = nn.Sequential(ternary, nn.ReLU(), ternary)
    report = model_size_report(shared)
    assert [(entry.name, entry.stored_bytes) for entry in report.entries] == [("0.weight", 20), ("0.weight_scale", 4)]
    assert split_extra_bytes(ternary) == 20 + 4
    with pytest.raises(TypeError, match="ternary"):
        split_extra_bytes(triton_bq.BinaryLinear(3, 5))
    with pytest.raises(ValueError, match="weight_method"):
        weight_bits("int4")


def test_report_from_config_on_meta_equals_the_instantiated_model():
    config = transformers.BertConfig(**CONFIG)
    quant = triton_bq.QuantConfig(weight_method="twn", backend="reference")
    for split in (False, True, ["bert.encoder.layer.0:ffn_in"]):
        from_config = model_size_report_from_config(config, quant_config=quant, split=split)
        model = ternary_tiny()
        if split is True:
            split_ternary_to_binary(model)
        elif split:
            split_ternary_to_binary(model, include=split)
        assert from_config.entries == model_size_report(model).entries


def test_bert_base_sizes_match_the_hand_formula():
    vocab, hidden, layers, inner, positions = 30522, 768, 12, 3072, 512
    quantized = layers * (4 * hidden * hidden + 2 * hidden * inner) + hidden * hidden + vocab * hidden
    linears = 6 * layers + 1
    fp32_rest = (positions + 2) * hidden + layers * (4 * hidden + inner + hidden) + hidden + 2 \
        + (2 * hidden + layers * 4 * hidden) + 2 * hidden
    act = 2 * linears + 8 * layers
    config = transformers.BertConfig(num_labels=2)
    ternary = model_size_report_from_config(config, quant_config=triton_bq.QuantConfig(weight_method="twn"))
    assert ternary.stored_bytes == quantized // 4 + 4 * (linears + vocab) + 4 * (fp32_rest + act)
    split = model_size_report_from_config(config, quant_config=triton_bq.QuantConfig(weight_method="twn"), split=True)
    assert split.stored_bytes == quantized // 4 + 8 * (linears + vocab) + 4 * (fp32_rest + act)
    fp = model_size_report_from_config(config)
    assert fp.stored_bytes == 4 * (quantized + fp32_rest) == 437_935_112
    # The paper's sizes are in MiB: BERT-base 418 (417.6), TernaryBERT 2-2-8 28.0 (28.07).
    assert round(fp.stored_bytes / 2**20) == 418 and round(ternary.stored_bytes / 2**20, 1) == 28.1


def test_table_lists_components_and_total():
    report = model_size_report(ternary_tiny())
    table = report.table("B")
    assert "| ternary weights | 17,408 | 69,632 | 4,352 |" in table
    # 19,372 Parameter values + 77 scales (13 Linear, 64 embedding rows).
    assert table.splitlines()[-1] == f"| **total** | 19,449 | {report.fp32_bytes:,} | 12,516 |"
    assert str(report) == report.table("MiB")
    with pytest.raises(ValueError, match="unit"):
        report.table("GB")
    assert isinstance(report, SizeReport)
