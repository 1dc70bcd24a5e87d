"""prepare_math on hand-written MATH fixtures, in each source format: the verl schema and the skipped rows."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppo_lightning.data.prepare_math import DEFAULT_SOURCE, INSTRUCTION, prepare
from sppo_lightning.data.prompts import read_prompts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "math"


def raw_rows(split):
    return [json.loads(p.read_text()) for p in sorted((FIXTURES / split).glob("*/*.json"))]


def as_jsonl(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw_rows(split)))
    return tmp_path


def as_parquet(tmp_path):
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_pylist(raw_rows(split)), tmp_path / f"{split}.parquet")
    return tmp_path


@pytest.mark.parametrize(
    "make_source", [lambda tmp: FIXTURES, as_jsonl, as_parquet], ids=["math-layout", "jsonl", "parquet"]
)
def test_every_source_format_gives_the_verl_schema(tmp_path, make_source, capsys):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = make_source(src_dir)
    counts = prepare(str(src), tmp_path / "out")
    assert counts == {"train": 3, "test": 2}  # one train problem has no boxed answer
    assert "skipped (no \\boxed answer in the solution)" in capsys.readouterr().err

    train = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    first = train[0]
    assert set(first) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert first["data_source"] == DEFAULT_SOURCE
    assert first["prompt"] == [{"role": "user", "content": f"What is $2+3$? {INSTRUCTION}"}]
    assert first["ability"] == "math"
    assert first["reward_model"] == {"style": "rule", "ground_truth": "5"}
    assert first["extra_info"] == {"split": "train", "index": 0, "level": "Level 1", "subject": "Algebra"}
    truths = [r["reward_model"]["ground_truth"] for r in train]
    assert truths == ["5", "\\frac{1}{2}", "9\\text{ cm}^2"]  # the last box of a solution wins
    test = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert [r["extra_info"]["subject"] for r in test] == ["Number Theory", "Precalculus"]

    # What it writes is what the datamodule reads.
    records = read_prompts(str(tmp_path / "out" / "test.parquet"))
    assert records[1].ground_truth == "\\frac{\\pi}{2}"


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sppo_lightning.data.prepare_math",
            "--source",
            str(empty),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no 'train' split" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_writes_both_files(tmp_path):
    shutil.copytree(FIXTURES, tmp_path / "src")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sppo_lightning.data.prepare_math",
            "--source",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "train.parquet").is_file() and (tmp_path / "out" / "test.parquet").is_file()
