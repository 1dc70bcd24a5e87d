"""Shared fixtures: tiny models are built from configs or taken from the shipped toy folder, never downloaded."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_model_dir() -> Path:
    from sppo_lightning.toy import MODEL_DIR

    return MODEL_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Qwen2 with the toy tokenizer, saved like any HF folder."""
    import torch

    from sppo_lightning.toy.build import build_model, build_tokenizer, save_tokenizer

    out = tmp_path_factory.mktemp("tiny_qwen2")
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    return out
