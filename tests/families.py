"""Tiny randomly initialised models of every family of triton_bq.arch.FAMILIES (no download), with inputs."""

import torch
import transformers

VOCAB = 64
_TEXT = dict(attn_implementation="eager")


def _bert_like(config_class, model_class, **extra):
    config = config_class(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=40, num_labels=2, **_TEXT, **extra)
    return model_class(config)


BUILDERS = {
    "bert": lambda: _bert_like(transformers.BertConfig, transformers.BertForSequenceClassification),
    "roberta": lambda: _bert_like(transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
    "distilbert": lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40, **_TEXT)),
    "albert": lambda: _bert_like(transformers.AlbertConfig, transformers.AlbertForSequenceClassification,
                                 embedding_size=16),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0, **_TEXT)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=40, **_TEXT)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=40, **_TEXT)),
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=3, **_TEXT)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
        **_TEXT)),
    "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
        scale_embedding=True, **_TEXT)),
}
FAMILY_NAMES = tuple(BUILDERS)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``family`` (a key of ``BUILDERS``), seeded, in eval mode."""
    torch.manual_seed(seed)
    return BUILDERS[family]().eval()


def model_inputs(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of 2 for ``family``'s model: pixels for ViT, encoder and decoder ids for T5 / BART, else ids with the
    second sequence padded after 4 tokens."""
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return dict(pixel_values=torch.randn(2, 3, 16, 16, generator=generator))
    ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    if family in ("t5", "bart"):
        return dict(input_ids=ids, decoder_input_ids=torch.randint(3, VOCAB, (2, 5), generator=generator))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return dict(input_ids=ids, attention_mask=mask)
