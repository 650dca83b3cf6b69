"""What the library knows about model families: the one architecture table.

Per Hugging Face family (``config.model_type``), ``FAMILIES`` says which modules ``triton_bq.quantize_`` turns into
quantized weights, which word embeddings it quantizes, which attention modules get Q/K/V/probability quantization
(and which projections feed them), which Linear inputs are quantized asymmetrically, and which weights are the
pooler (``QuantConfig.quantize_pooler``). Everything a family does not list stays in full precision: task heads,
position / token-type embeddings, normalization, ViT's patch convolution, T5's relative attention bias.

Module names are matched with ``re.search`` against the dotted name ``model.named_modules()`` gives, so one
pattern covers ``BertModel`` (``encoder.layer.0...``) and ``BertForSequenceClassification``
(``bert.encoder.layer.0...``) alike. A model whose family is not in the table gets the generic swap of
``triton_bq.convert`` (every ``nn.Linear`` / ``Conv1D`` but task heads, the input embedding) and one warning listing
what stayed in full precision. Supporting a new family means adding one ``Family`` here.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

__all__ = [
    "BERT_ASYM_ACT_SUFFIXES",
    "BERT_SPLIT_GROUPS",
    "CAUSAL_LM_MODEL_TYPES",
    "FAMILIES",
    "HEAD_NAMES",
    "Family",
    "family_of",
    "is_asym_site",
    "is_causal_lm",
    "matches",
]

# Task heads are kept in full precision (the papers keep the classifier); used by the generic swap only.
HEAD_NAMES = ("classifier", "lm_head", "qa_outputs", "score", "cls", "head", "heads", "classification_head")

# BERT's FFN-output input follows GELU, so it is quantized asymmetrically (min-max) at 8 bits. Suffix rule of the
# generic swap (families outside the table) and of an explicit ``QuantConfig.asym_act_names``.
BERT_ASYM_ACT_SUFFIXES = ("output.dense",)

# BinaryBERT's adaptive-splitting candidates per layer: Q and K together, V, attention output, FFN-in, FFN-out.
BERT_SPLIT_GROUPS = (
    (re.compile(r"^(?P<prefix>.+)\.attention\.self\.(query|key)$"), "qk"),
    (re.compile(r"^(?P<prefix>.+)\.attention\.self\.value$"), "v"),
    (re.compile(r"^(?P<prefix>.+)\.attention\.output\.dense$"), "o"),
    (re.compile(r"^(?P<prefix>.+)\.intermediate\.dense$"), "ffn_in"),
    (re.compile(r"^(?P<prefix>.+)\.output\.dense$"), "ffn_out"),
)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family of the architecture table (all name fields are regular expressions for ``re.search``).

    Attributes:
        name: short family name.
        model_types: the Hugging Face ``config.model_type`` values of the family.
        weights: ``nn.Linear`` / ``Conv1D`` modules that become quantized weights.
        pooler: the pooler weights among ``weights``, kept in full precision when ``quantize_pooler=False``.
        embeddings: word embeddings (``nn.Embedding`` or a subclass) that become ``QuantEmbedding``; embeddings tied to
            them (same weight Parameter) are quantized with them.
        attention: class names of the attention modules whose Q, K, V and probabilities are quantized.
        projections: the Q/K/V projections inside those attention modules (fused ``c_attn`` for GPT-2).
        asym_sites: Linear / ``Conv1D`` whose input is quantized asymmetrically at 8 bits (inputs after GELU/ReLU).
    """

    name: str
    model_types: tuple[str, ...]
    weights: tuple[str, ...]
    embeddings: tuple[str, ...]
    attention: tuple[str, ...]
    projections: tuple[str, ...]
    asym_sites: tuple[str, ...] = ()
    pooler: tuple[str, ...] = ()


_BERT_LAYER = r"(^|\.)layer\.\d+\."
_BERT_LIKE = dict(
    weights=(
        _BERT_LAYER + r"(attention|crossattention)\.self\.(query|key|value)$",
        _BERT_LAYER + r"(attention|crossattention)\.output\.dense$",
        _BERT_LAYER + r"intermediate\.dense$",
        _BERT_LAYER + r"output\.dense$",
        r"(^|\.)pooler\.dense$",
    ),
    pooler=(r"(^|\.)pooler\.dense$",),
    embeddings=(r"(^|\.)embeddings\.word_embeddings$",),
    projections=(_BERT_LAYER + r"(attention|crossattention)\.self\.(query|key|value)$",),
    asym_sites=(_BERT_LAYER + r"output\.dense$",),
)
_DECODER_LAYER = r"(^|\.)layers\.\d+\."
_LLAMA_PROJECTIONS = _DECODER_LAYER + r"self_attn\.(q_proj|k_proj|v_proj)$"
_ENCODER_DECODER_EMBEDDINGS = (r"(^|\.)shared$", r"(^|\.)(encoder|decoder)\.embed_tokens$")

FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), attention=("BertSelfAttention", "BertCrossAttention"), **_BERT_LIKE),
    Family("roberta", ("roberta",), attention=("RobertaSelfAttention", "RobertaCrossAttention"), **_BERT_LIKE),
    Family(
        "distilbert", ("distilbert",),
        weights=(_BERT_LAYER + r"attention\.(q_lin|k_lin|v_lin|out_lin)$", _BERT_LAYER + r"ffn\.(lin1|lin2)$"),
        embeddings=(r"(^|\.)embeddings\.word_embeddings$",),
        attention=("DistilBertSelfAttention",),
        projections=(_BERT_LAYER + r"attention\.(q_lin|k_lin|v_lin)$",),
        asym_sites=(_BERT_LAYER + r"ffn\.lin2$",),
    ),
    Family(
        "albert", ("albert",),
        weights=(
            r"(^|\.)encoder\.embedding_hidden_mapping_in$",
            r"(^|\.)albert_layers\.\d+\.attention\.(query|key|value|dense)$",
            r"(^|\.)albert_layers\.\d+\.(ffn|ffn_output)$",
            r"(^|\.)pooler$",
        ),
        pooler=(r"(^|\.)pooler$",),
        embeddings=(r"(^|\.)embeddings\.word_embeddings$",),
        attention=("AlbertAttention",),
        projections=(r"(^|\.)albert_layers\.\d+\.attention\.(query|key|value)$",),
        asym_sites=(r"(^|\.)albert_layers\.\d+\.ffn_output$",),
    ),
    Family(
        "gpt2", ("gpt2",),
        weights=(r"(^|\.)h\.\d+\.(attn|crossattention)\.(c_attn|q_attn|c_proj)$", r"(^|\.)h\.\d+\.mlp\.(c_fc|c_proj)$"),
        embeddings=(r"(^|\.)wte$",),
        attention=("GPT2Attention",),
        projections=(r"(^|\.)h\.\d+\.(attn|crossattention)\.(c_attn|q_attn)$",),
        asym_sites=(r"(^|\.)h\.\d+\.mlp\.c_proj$",),
    ),
    Family(
        # SiLU-gated MLPs: the down projection's input is signed, so no asymmetric site.
        "llama", ("llama", "mistral", "qwen2"),
        weights=(_DECODER_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
                 _DECODER_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)$"),
        embeddings=(r"(^|\.)embed_tokens$",),
        attention=("LlamaAttention", "MistralAttention", "Qwen2Attention"),
        projections=(_LLAMA_PROJECTIONS,),
    ),
    Family(
        # The patch embedding is a convolution and stays in full precision.
        "vit", ("vit",),
        weights=(_DECODER_LAYER + r"attention\.(q_proj|k_proj|v_proj|o_proj)$", _DECODER_LAYER + r"mlp\.(fc1|fc2)$",
                 r"(^|\.)pooler\.dense$"),
        pooler=(r"(^|\.)pooler\.dense$",),
        embeddings=(),
        attention=("ViTAttention",),
        projections=(_DECODER_LAYER + r"attention\.(q_proj|k_proj|v_proj)$",),
        asym_sites=(_DECODER_LAYER + r"mlp\.fc2$",),
    ),
    Family(
        "t5", ("t5",),
        weights=(r"(^|\.)block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v|o)$",
                 r"(^|\.)block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1|wo)$"),
        embeddings=_ENCODER_DECODER_EMBEDDINGS,
        attention=("T5Attention",),
        projections=(r"(^|\.)block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v)$",),
        asym_sites=(r"(^|\.)block\.\d+\.layer\.\d+\.DenseReluDense\.wo$",),
    ),
    Family(
        "bart", ("bart",),
        weights=(_DECODER_LAYER + r"(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)$",
                 _DECODER_LAYER + r"(fc1|fc2)$"),
        embeddings=_ENCODER_DECODER_EMBEDDINGS,
        attention=("BartAttention",),
        projections=(_DECODER_LAYER + r"(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj)$",),
        asym_sites=(_DECODER_LAYER + r"fc2$",),
    ),
)


def matches(patterns: tuple[str, ...], name: str) -> bool:
    """Whether the dotted module name ``name`` matches one of the regular expressions ``patterns``."""
    return any(re.search(pattern, name) for pattern in patterns)


def family_of(model: nn.Module) -> Family | None:
    """The table entry of ``model`` (by ``model.config.model_type``), or ``None`` for a family outside the table."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def is_asym_site(name: str, suffix: str) -> bool:
    """Whether the Linear called ``name`` is the site ``suffix`` outside attention (``output.dense`` is BERT's FFN
    output, ``attention.output.dense`` is not)."""
    return (name == suffix or name.endswith("." + suffix)) and ".attention." not in f".{name}"


# Decoder-only families (Hugging Face ``config.model_type``): their activations take per-token scales by default.
CAUSAL_LM_MODEL_TYPES = (
    "llama", "gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
    "gemma2", "phi", "phi3", "falcon", "bloom", "olmo", "starcoder2", "codegen",
)


def is_causal_lm(model) -> bool:
    """Whether ``model`` predicts each token from the previous ones only (a decoder-only or ``is_decoder`` model, or a
    ``...ForCausalLM`` class), so that no activation statistic may mix tokens."""
    if any(cls.__name__.endswith("ForCausalLM") for cls in type(model).__mro__):
        return True
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    return bool(getattr(config, "is_decoder", False)) or getattr(config, "model_type", None) in CAUSAL_LM_MODEL_TYPES
