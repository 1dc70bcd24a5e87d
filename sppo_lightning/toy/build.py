"""Rebuild the tiny Qwen2-architecture model shipped in ``sppo_lightning/toy/model``.

    python -m sppo_lightning.toy.build [--out DIR]

It writes a character-level tokenizer with a Qwen-style chat template, then pre-trains a ~0.6M-parameter
Qwen2 model by supervised learning on the train split of the addition task and stops as soon as its greedy
validation accuracy reaches ``--target-accuracy`` (default 30 %): good enough to produce correct samples,
far enough from perfect that self-play has something to learn.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from sppo_lightning.toy import MODEL_DIR
from sppo_lightning.toy.task import addition_records, format_answer

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer without merges: every byte is one token, as in Qwen2's scheme minus the merges.

    Being byte-level is what makes it safe: transformers loads any folder whose config says ``qwen2`` with
    ``Qwen2Tokenizer``, whatever ``tokenizer_config.json`` pins, and that class re-applies its own byte-level
    pre-tokenizer to the vocabulary in ``tokenizer.json``. A vocabulary of plain characters would lose every space.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for the bytes
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *byte_chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # Name the class transformers will use anyway for a qwen2 config, so the folder says what it is.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def build_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def sft_batch(tokenizer, records: list[dict]) -> dict[str, torch.Tensor]:
    """Prompt + answer + EOS, loss on the answer tokens only."""
    rows, labels = [], []
    for rec in records:
        prompt = tokenizer.apply_chat_template(rec["prompt"], add_generation_prompt=True, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(format_answer(int(rec["reward_model"]["ground_truth"])), add_special_tokens=False)[
            "input_ids"
        ] + [tokenizer.eos_token_id]
        rows.append(p_ids + r_ids)
        labels.append([-100] * len(p_ids) + r_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


@torch.no_grad()
def greedy_accuracy(model, tokenizer, records: list[dict]) -> float:
    from sppo_lightning.rewards.math import compute_score

    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in records]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train()
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    scores = [compute_score(t, r["reward_model"]["ground_truth"]) for t, r in zip(texts, records, strict=True)]
    return sum(scores) / len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--target-accuracy", type=float, default=0.30)
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    train = addition_records("train", seed=args.seed)
    val = addition_records("val", num_prompts=200, seed=args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    rng = random.Random(args.seed)
    acc = 0.0
    for step in range(1, args.max_steps + 1):
        loss = model(**sft_batch(tokenizer, rng.sample(train, 64))).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0:
            acc = greedy_accuracy(model, tokenizer, val)
            print(f"step {step:5d}  loss {loss.item():.3f}  greedy val accuracy {acc:.1%}", flush=True)
            if acc >= args.target_accuracy:
                break
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    model.generation_config.save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)
    print(f"saved to {args.out} (greedy val accuracy {acc:.1%}, {sum(p.numel() for p in model.parameters()):,} params)")


if __name__ == "__main__":
    main()
