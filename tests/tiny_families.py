"""Tiny random models of the shipped configs' architecture families, saved as Hugging Face folders with the toy
tokenizer and its chat template (nothing downloaded).

Each keeps what distinguishes the real checkpoint a config names (read from its published ``config.json``) at toy
width: the class, an untied output head, grouped-query attention, no sliding window where the real one has none.

- Qwen/Qwen2.5-7B-Instruct: Qwen2ForCausalLM, 28 query / 4 key-value heads, ``tie_word_embeddings: false``,
  ``use_sliding_window: false``.
- mistralai/Mistral-7B-Instruct-v0.2: MistralForCausalLM, 32 / 8 heads, untied, ``sliding_window: null`` (v0.2).
- meta-llama/Meta-Llama-3-8B-Instruct: LlamaForCausalLM, 32 / 8 heads, untied.
"""

from __future__ import annotations

from pathlib import Path

import torch

# toy width, the real head ratios' grouping kept (several query heads per key-value head)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
}


def build_family(family: str, out: Path, seed: int = 0) -> Path:
    """A random ``family`` model with an untied head and GQA, plus the toy tokenizer, in ``out``; returns ``out``."""
    import transformers

    from sppo_lightning.toy.build import build_tokenizer, save_tokenizer

    config_name, model_name, extra = FAMILIES[family]
    tok = build_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **SHAPE, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    return out
