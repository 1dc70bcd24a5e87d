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


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory):
    """A random 2-layer Qwen2 with a one-logit classification head and the toy tokenizer, saved like any HF folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from sppo_lightning.toy.build import build_tokenizer, save_tokenizer

    out = tmp_path_factory.mktemp("tiny_rm")
    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="session")
def tiny_pairrm_dir(tmp_path_factory) -> Path:
    """A random PairRM-architecture judge (DeBERTa-v2 encoder + pairwise head) in the hub's layout."""
    from tests.rewards.tiny_pairrm import build_tiny_pairrm

    return build_tiny_pairrm(tmp_path_factory.mktemp("tiny_pairrm"))


@pytest.fixture(scope="session")
def dropout_model_dir(tmp_path_factory) -> Path:
    """The shipped toy model with ``attention_dropout: 0.5`` in its config, as real models' folders carry dropout."""
    import json
    import shutil

    from sppo_lightning.toy import MODEL_DIR

    out = tmp_path_factory.mktemp("toy_dropout") / "model"
    shutil.copytree(MODEL_DIR, out)
    config = json.loads((out / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# ------------------------------------------------------------------------------------------- parallel workers
# pyproject's addopts run the suite on 4 pytest-xdist workers. Each worker (and every train.py it starts, through
# the environment) then uses one torch thread: workers of two threads each on two cores spend their time waiting on
# each other's threads (OpenMP spins), and the toy model's matrices are too small for a second thread to pay.


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    # The end-to-end runs first, the quick tests after them: the workers then finish together instead of one of them
    # running the last long test alone (longest first is the classic rule for packing jobs onto a few machines).
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
