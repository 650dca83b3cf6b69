"""What the library knows about model families: module names of task heads, activation sites that take asymmetric
quantization, and how a Transformer layer's matrices group into adaptive-splitting candidates.

Every family-specific name the rest of the package uses is defined here, so that supporting a new family means
editing this one module.
"""

from __future__ import annotations

import re

__all__ = ["BERT_ASYM_ACT_SUFFIXES", "BERT_SPLIT_GROUPS", "HEAD_NAMES", "is_asym_site"]

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
