"""Tiny language models built from config, offline, for the caption tests.

``word_tokenizer`` builds a word-level tokenizer in memory (``tokenizers``), ``chain_lm`` a
1-layer Llama whose weights are *set* so that it is a real model with known outputs: attention
and MLP outputs are zeroed, embeddings are one-hot and the LM head maps each token to its
allowed successors, so generation walks a word chain (sampling picks among equal successors).
``random_lm`` / ``random_t5`` are the same sizes with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

# a word chain that writes valid mug captions (the caption tests' chain_lm)
WORDS = "A <new1> mug sits on wooden desk beside laptop in morning evening light".split()
CHAIN = {"[UNK]": ["A"], "A": ["<new1>"], "<new1>": ["mug"], "mug": ["sits"], "sits": ["on"],
         "on": ["wooden"], "wooden": ["desk"], "desk": ["beside"], "beside": ["laptop"],
         "laptop": ["in"], "in": ["morning", "evening"], "morning": ["light"], "evening": ["light"],
         "light": ["[EOS]"]}


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *dict.fromkeys(words)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def _llama(tok, d: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def chain_lm(out: Path, words: list[str], successors: dict[str, list[str]]) -> Path:
    """Save a causal LM + tokenizer to ``out`` that continues any prompt ending in an unknown
    word along ``successors`` ("[UNK]" -> first word ... -> "[EOS]")."""
    tok = word_tokenizer(words)
    m = _llama(tok)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.model.embed_tokens.weight.copy_(torch.eye(len(tok), m.config.hidden_size))
        m.model.norm.weight.fill_(1.0)
        m.lm_head.weight.zero_()
        for a, nexts in successors.items():
            for b in nexts:
                m.lm_head.weight[tok.convert_tokens_to_ids(b), tok.convert_tokens_to_ids(a)] = 3.0
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_lm(out: Path, words: list[str]) -> Path:
    tok = word_tokenizer(words)
    _llama(tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_t5(out: Path, words: list[str]) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = word_tokenizer(words)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
