"""The built-in arithmetic task: two-number addition asked in chat form, answered in ``\\boxed{}``.

Prompts are generated in code (nothing to download) and split deterministically into a train and a
validation pool so that validation never sees a training prompt.
"""

from __future__ import annotations

import random
import zlib

from sppo_lightning.data.prompts import PromptSource, record_from_row

INSTRUCTION = "What is {a}+{b}?"


def _split_of(a: int, b: int) -> str:
    # A fixed hash of the pair decides its split: stable across Python versions (unlike hash()), and unrelated
    # to the digits (a linear hash mod 10 would put exactly the sums ending in 0 in validation).
    return "val" if zlib.crc32(f"{a}+{b}".encode()) % 10 == 0 else "train"


def addition_problems(split: str, max_operand: int = 99) -> list[tuple[int, int]]:
    """All pairs (a, b) with 0 <= a, b <= max_operand that belong to ``split`` ("train" or "val")."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1) if _split_of(a, b) == split]


def difficulty(a: int, b: int) -> int:
    """1 + the number of carries, so validation reports accuracy by level as it does for MATH's levels 1-5."""
    carries, carry = 0, 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry >= 10)
        carries += carry
        a, b = a // 10, b // 10
    return 1 + carries


def make_record(a: int, b: int) -> dict:
    """One prompt in the same shape as a row of verl's parquet schema."""
    return {
        "data_source": "toy/addition",
        "prompt": [{"role": "user", "content": INSTRUCTION.format(a=a, b=b)}],
        "reward_model": {"style": "rule", "ground_truth": str(a + b)},
        "extra_info": {"a": a, "b": b, "level": difficulty(a, b)},
    }


def addition_records(split: str, num_prompts: int | None = None, seed: int = 0, max_operand: int = 99) -> list[dict]:
    """``num_prompts`` records drawn without replacement from the split (all of them when None)."""
    pairs = addition_problems(split, max_operand)
    random.Random(seed).shuffle(pairs)
    if num_prompts is not None:
        if num_prompts > len(pairs):
            raise ValueError(f"num_prompts={num_prompts} exceeds the {len(pairs)} {split} problems available")
        pairs = pairs[:num_prompts]
    return [make_record(a, b) for a, b in pairs]


def format_answer(total: int) -> str:
    """The response a perfect policy writes."""
    return f"\\boxed{{{total}}}"


class AdditionPrompts(PromptSource):
    """The addition task as a prompt source (``class_path: sppo_lightning.toy.AdditionPrompts``)."""

    def __init__(self, split: str = "train", num_prompts: int | None = None, seed: int = 0):
        """
        Args:
            split: ``train`` or ``val``; the two never share a problem.
            num_prompts: How many problems to draw from the split; None = all of it.
            seed: Which ones.
        """
        self.split, self.num_prompts, self.seed = split, num_prompts, seed

    def load(self):
        rows = addition_records(self.split, self.num_prompts, self.seed)
        return [record_from_row(row, f"toy addition {self.split} #{i}") for i, row in enumerate(rows)]
