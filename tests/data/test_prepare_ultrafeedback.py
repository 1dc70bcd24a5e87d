"""prepare_ultrafeedback on a hand-written fixture in the hub's schema (HuggingFaceH4/ultrafeedback_binarized):
prompts only, verl's schema, empty and repeated prompts skipped, readable by the prompt loader."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppo_lightning.data.prepare_ultrafeedback import DEFAULT_SOURCE, prepare
from sppo_lightning.data.prompts import PromptFiles
from sppo_lightning.errors import DataError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ultrafeedback"
TRAIN = [  # the fixture's train_prefs, minus the blank prompt (c3) and the second "reverse a list" (e5)
    ("a1", "Write a haiku about autumn leaves."),
    ("b2", "How do I reverse a list in Python?"),
    ("d4", "Explain photosynthesis to a child."),
    ("f6", "Translate 'good morning' into French."),
]


def test_prompts_only_in_verl_schema(tmp_path, capsys):
    assert prepare(str(FIXTURE), tmp_path) == {"train": 4, "test": 2}
    out = capsys.readouterr().out
    assert "train: 4 prompts from train_prefs" in out and "(skipped: 1 empty, 1 repeated)" in out
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert [(r["extra_info"]["prompt_id"], r["prompt"][0]["content"]) for r in rows] == TRAIN
    assert rows[0] == {
        "data_source": DEFAULT_SOURCE,
        "prompt": [{"role": "user", "content": TRAIN[0][1]}],  # no completion, rating or chosen/rejected survives
        "ability": "chat",
        "reward_model": {"style": "model", "ground_truth": ""},
        "extra_info": {"split": "train", "index": 0, "prompt_id": "a1"},
    }
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2, 3]
    # the loader takes them as they are: a model judges, so no ground truth is needed
    records = PromptFiles(str(tmp_path / "test.parquet")).load()
    assert [r.messages[0]["content"] for r in records] == [
        "What is the capital of Australia?",
        "Give me three tips for better sleep.",
    ]
    assert all(r.ground_truth == "" and len(r.messages) == 1 for r in records)


def test_one_split_only(tmp_path):
    assert prepare(str(FIXTURE), tmp_path, {"train": "train_prefs"}) == {"train": 4}
    assert not (tmp_path / "test.parquet").exists()


def test_parquet_source_and_the_authors_prompt_sets_schema(tmp_path):
    """The UCLA-AGI prompt sets have a single ``prompt`` column and one ``train`` split."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": p} for _, p in TRAIN]), src / "train.parquet")
    assert prepare(str(src), tmp_path / "out", {"train": "train"}) == {"train": 4}
    rows = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert [r["prompt"][0]["content"] for r in rows] == [p for _, p in TRAIN]


def test_a_rule_scored_row_still_needs_its_ground_truth(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "2+2?", "reward_model": {"style": "rule", "ground_truth": ""}}\n')
    with pytest.raises(DataError, match="missing or empty ground truth"):
        PromptFiles(str(path)).load()


def test_cli_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sppo_lightning.data.prepare_ultrafeedback", "--source", str(tmp_path), "--out",
         str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    expected = f"error: {tmp_path}: no 'train_prefs' split (expected train_prefs.jsonl or train_prefs.parquet)"
    assert proc.stderr.strip() == expected
