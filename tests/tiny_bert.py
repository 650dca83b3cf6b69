"""The tiny randomly initialised BERT most tests share (no download), and a padded batch for it."""

import torch
import transformers

# 2 layers of 4 heads (head size 8), FFN 48, vocabulary 64, 32 positions: hand-countable sizes, odd enough shapes.
CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=32, type_vocab_size=2, num_labels=2, attn_implementation="eager")


def tiny_bert(seed: int = 0, **overrides) -> transformers.BertForSequenceClassification:
    """``BertForSequenceClassification`` of ``CONFIG`` (updated with ``overrides``), seeded, in eval mode."""
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**{**CONFIG, **overrides})).eval()


def bert_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """3 sequences of 10 tokens; the first padded after 7 tokens, the third after 4."""
    torch.manual_seed(seed)
    ids = torch.randint(1, CONFIG["vocab_size"], (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    return dict(input_ids=ids, attention_mask=mask)
