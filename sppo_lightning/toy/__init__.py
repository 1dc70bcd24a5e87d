"""The built-in toy task (two-number addition) and the tiny model shipped to learn it."""

from pathlib import Path

from sppo_lightning.toy.task import AdditionPrompts, addition_records

MODEL_DIR = Path(__file__).parent / "model"
"""The shipped tiny Qwen2 model and tokenizer (rebuild with ``python -m sppo_lightning.toy.build``)."""

__all__ = ["MODEL_DIR", "AdditionPrompts", "addition_records"]
