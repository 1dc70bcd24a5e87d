"""Reading prompt files: verl's parquet schema as is, plain jsonl, and clear errors naming file and row."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppo_lightning.data.prompts import PromptFiles, read_prompts
from sppo_lightning.errors import DataError

VERL_ROW = {
    "data_source": "DigitalLearningGmbH/MATH-lighteval",
    "prompt": [
        {
            "role": "user",
            "content": "What is $1+1$? Let's think step by step and output the final answer within \\boxed{}.",
        }
    ],
    "ability": "math",
    "reward_model": {"style": "rule", "ground_truth": "2"},
    "extra_info": {"split": "train", "index": 0, "level": "Level 1", "subject": "Algebra"},
}


def test_verl_parquet_schema_read_unchanged(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [VERL_ROW, {**VERL_ROW, "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"}}]
        ),
        path,
    )
    records = read_prompts(str(path))
    assert len(records) == 2
    assert records[0].messages == VERL_ROW["prompt"]
    assert records[0].ground_truth == "2"
    assert records[1].ground_truth == "\\frac{1}{2}"
    assert records[0].data_source == "DigitalLearningGmbH/MATH-lighteval"
    assert records[0].extra_info["level"] == "Level 1"


def test_plain_jsonl_with_string_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "2+2?", "answer": 4})
        + "\n\n"
        + json.dumps({"problem": "3+3?", "ground_truth": "6"})
        + "\n"
    )
    records = PromptFiles(str(path)).load()
    assert [r.messages for r in records] == [
        [{"role": "user", "content": "2+2?"}],
        [{"role": "user", "content": "3+3?"}],
    ]
    assert [r.ground_truth for r in records] == ["4", "6"]


def test_limit_and_several_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(3)))
    b.write_text(json.dumps({"prompt": "last", "answer": 9}) + "\n")
    assert [r.ground_truth for r in PromptFiles([str(a), str(b)]).load()] == ["0", "1", "2", "9"]
    assert len(PromptFiles([str(a), str(b)], limit=2).load()) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "answer": 1', "p.jsonl:2: not valid JSON"),
        ('{"answer": 1}', "p.jsonl:2: missing 'prompt'"),
        ('{"prompt": "x"}', "p.jsonl:2: missing or empty ground truth"),
        ('{"prompt": "   ", "answer": 1}', "p.jsonl:2: the prompt is empty"),
        ("[1, 2]", "p.jsonl:2: expected an object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "answer": 1}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_prompts(str(path))


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no prompts"):
        read_prompts(str(tmp_path / "empty.jsonl"))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        read_prompts(str(path))


def test_token_ids_are_the_tokenizer_calls_and_leave_its_padding_as_it_was():
    """The fast batch path gives ``tok(texts)``'s ids for a tokenizer that carries padding of its own (the toy
    model's) and one that truncates (which takes ``tok(...)`` itself), and leaves the tokenizer's settings as found."""
    from transformers import AutoTokenizer

    from sppo_lightning.data.datamodule import token_ids

    toy = Path(__file__).resolve().parents[2] / "sppo_lightning" / "toy" / "model"
    texts = ["<|im_start|>user\nWhat is 7+49?<|im_end|>\n<|im_start|>assistant\n", "x", ""]
    tok = AutoTokenizer.from_pretrained(toy)
    padding = tok.backend_tokenizer.padding
    assert padding is not None  # the case the fast path must switch off for the call
    fresh = AutoTokenizer.from_pretrained(toy)
    assert token_ids(tok, texts) == fresh(texts, add_special_tokens=False)["input_ids"]
    assert [len(ids) for ids in token_ids(tok, texts)][1:] == [1, 0]  # not padded to the longest
    assert tok.backend_tokenizer.padding == padding
    tok.backend_tokenizer.enable_truncation(max_length=5)
    assert token_ids(tok, texts) == fresh(texts, add_special_tokens=False)["input_ids"]
