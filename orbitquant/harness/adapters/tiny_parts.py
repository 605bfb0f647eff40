"""Tiny, offline parts for random-init test pipelines: tokenizers built in memory, text encoders from config, and
one small KL VAE.

transformers 5.x ignores ``vocab_file=`` / ``merges_file=`` for some tokenizers (garbage ids), so the
vocabularies are passed as in-memory objects. Numbers produced with these encoders mean nothing; they
exist to exercise the real pipeline code paths on CPU.
"""

from __future__ import annotations

import string

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "car", "tree", "house", "on", "in", "with", "small", "big", "sky", "sea", "person", "bird", "flower", "city", "night", "day", "painting"]


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(ch, -5.0) for ch in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_model(tok, hidden: int = 32, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CLIPTextModel(cfg).eval()


def t5_encoder(tok, d_model: int = 32, seed: int = 0, umt5: bool = False, d_ff: int | None = None):
    """A 2-layer (UM)T5 encoder; ``d_model`` is its output width, ``d_ff`` (default ``2 * d_model``) its MLP width
    (random-init stand-ins for 4096-wide T5-XXL outputs pass a small one to stay small)."""
    import torch
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    cfg = cfg_cls(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=d_ff or 2 * d_model, num_layers=2, num_heads=2,
                  relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  decoder_start_token_id=tok.pad_token_id)
    return model_cls(cfg).eval()


def chat_tokenizer(max_length: int = 64):
    """A word-level fast tokenizer with a minimal chat template (stands in for Qwen's in Z-Image tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in WORDS + ["user", "assistant"]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", model_max_length=max_length)
    tok.chat_template = "{% for m in messages %}<bos> {{ m['content'] }} <eos>{% endfor %}"
    return tok


def qwen3_model(tok, hidden: int = 16, seed: int = 0, head_dim: int | None = None, intermediate: int | None = None,
                max_positions: int = 128):
    """A 2-layer Qwen3; ``hidden`` is its output width, ``head_dim`` (default ``hidden // 2``, 2 heads) and
    ``intermediate`` (default ``2 * hidden``) its inner widths (small ones keep a 2560-wide stand-in small)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      head_dim=head_dim or hidden // 2, max_position_embeddings=max_positions,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Qwen3Model(cfg).eval()


def tiny_kl_vae(latent_channels: int = 4, **config):
    """A two-level ``AutoencoderKL`` (8 and 16 channels, 2x spatial compression) with ``latent_channels``; ``config``
    overrides the rest (e.g. FLUX's ``use_quant_conv=False``). The image families' tiny pipelines share it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{"block_out_channels": (8, 16), "latent_channels": latent_channels, "norm_num_groups": 8,
                            "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
                            **config})
