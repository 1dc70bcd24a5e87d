"""A randomly initialised Qwen2 of a chosen size with the toy tokenizer, for timing runs where nothing can be
downloaded (the numbers measure speed and memory only: a random model's answers are noise).

    python benchmarks/random_model.py --out /tmp/qwen2-200m --hidden 1024 --layers 16
    python benchmarks/epoch_breakdown.py -- --model.model_name_or_path=/tmp/qwen2-200m --trainer.accelerator=gpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from argtypes import at_least  # noqa: E402


def random_qwen2(hidden: int = 1024, layers: int = 16, heads: int = 16):
    """(model, tokenizer): a Qwen2 of that shape with random weights (seed 0) and the toy tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sppo_lightning.toy.build import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config), tok


def main() -> None:
    from sppo_lightning.toy.build import save_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=at_least(1), default=1024)
    parser.add_argument("--layers", type=at_least(1), default=16)
    parser.add_argument("--heads", type=at_least(1), default=16)
    args = parser.parse_args()

    model, tok = random_qwen2(args.hidden, args.layers, args.heads)
    model.save_pretrained(args.out, safe_serialization=True)
    save_tokenizer(tok, args.out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {args.out}")


if __name__ == "__main__":
    main()
