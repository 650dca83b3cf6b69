"""What the library knows about model families: module names of task heads, activation sites that take asymmetric
quantization, and how a Transformer layer's matrices group into adaptive-splitting candidates.

Every family-specific name the rest of the package uses is defined here, so that supporting a new family means
editing this one module.
"""

from __future__ import annotations

import re

__all__ = ["BERT_ASYM_ACT_SUFFIXES", "BERT_SPLIT_GROUPS", "CAUSAL_LM_MODEL_TYPES", "HEAD_NAMES", "is_asym_site",
           "is_causal_lm"]

# Task heads are kept in full precision (the papers keep the classifier).
HEAD_NAMES = ("classifier", "lm_head", "qa_outputs", "score", "cls", "head", "heads")

# BERT's FFN-output input follows GELU, so it is quantized asymmetrically (min-max) at 8 bits.
BERT_ASYM_ACT_SUFFIXES = ("output.dense",)

# BinaryBERT's adaptive-splitting candidates per layer: Q and K together, V, attention output, FFN-in, FFN-out.
BERT_SPLIT_GROUPS = (
    (re.compile(r"^(?P<prefix>.+)\.attention\.self\.(query|key)$"), "qk"),
    (re.compile(r"^(?P<prefix>.+)\.attention\.self\.value$"), "v"),
    (re.compile(r"^(?P<prefix>.+)\.attention\.output\.dense$"), "o"),
    (re.compile(r"^(?P<prefix>.+)\.intermediate\.dense$"), "ffn_in"),
    (re.compile(r"^(?P<prefix>.+)\.output\.dense$"), "ffn_out"),
)


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
