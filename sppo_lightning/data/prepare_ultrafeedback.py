"""UltraFeedback's prompts, and nothing else, as the SPPO paper uses them:
``python -m sppo_lightning.data.prepare_ultrafeedback --out DIR``.

The SPPO authors (uclaml/SPPO) train on UltraFeedback's ~60k prompts only: their prompt sets
``UCLA-AGI/data-mistral-7b-instruct-sppo-iter{1,2,3}`` (19.8k, 20k, 20k rows, one column ``prompt``) are three
disjoint thirds, one per iteration; the responses are the policy's own, judged by PairRM. This script writes the
same thing from the hub's ``HuggingFaceH4/ultrafeedback_binarized`` (or a local copy in its schema):

- ``DIR/train.parquet`` from ``train_prefs`` (61,135 rows on the hub), ``DIR/test.parquet`` from ``test_prefs``
  (2,000), each row ``{data_source, prompt: [one user turn], ability: "chat", reward_model: {style: "model",
  ground_truth: ""}, extra_info: {split, index, prompt_id}}`` (verl's schema; ``style: model`` says a judge, not a
  rule, scores it, so there is no ground truth). UltraFeedback's own completions, ratings and chosen/rejected pairs
  are dropped.
- Empty prompts are skipped, and repeated prompts kept once (the first), with a count of each.

The three iterations' thirds come from the training config, not from files: ``data.prompts_per_epoch`` = a third
of the train prompts, and the first pass over the shuffled set gives each iteration its own disjoint third.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sppo_lightning.data.prompts import iter_rows
from sppo_lightning.errors import DataError

DEFAULT_SOURCE = "HuggingFaceH4/ultrafeedback_binarized"
SPLITS = {"train": "train_prefs", "test": "test_prefs"}  # our file <- the hub's split

Rows = list[tuple[dict, str]]
"""``(row, where)`` pairs: a raw row and the file/line or hub row it came from."""


def read_split(source: str, split: str) -> Rows:
    """One split's raw rows from a folder (``<split>.jsonl`` or ``<split>.parquet``) or a hub dataset id."""
    root = Path(source)
    if root.exists():
        if not root.is_dir():
            raise DataError(f"{source}: expected a folder holding {split}.jsonl or {split}.parquet, or a hub id")
        for suffix in (".jsonl", ".parquet"):
            if (root / f"{split}{suffix}").is_file():
                return list(iter_rows(root / f"{split}{suffix}"))
        raise DataError(f"{source}: no '{split}' split (expected {split}.jsonl or {split}.parquet)")
    import datasets

    ds = datasets.load_dataset(source, split=split)
    return [(dict(r), f"{source}[{split}] row {i}") for i, r in enumerate(ds)]


def prompt_of(row: dict, where: str) -> str:
    """The user's prompt: ``prompt`` (ultrafeedback_binarized, the UCLA-AGI sets) or ``instruction`` (openbmb)."""
    prompt = row.get("prompt", row.get("instruction"))
    if not isinstance(prompt, str):
        raise DataError(f"{where}: missing 'prompt' (a string)")
    return prompt


def to_prompt_rows(rows: Rows, split: str, data_source: str) -> tuple[list[dict], int, int]:
    """verl-schema rows, and how many empty and repeated prompts were skipped."""
    out, seen, empty, repeated = [], set(), 0, 0
    for row, where in rows:
        prompt = prompt_of(row, where)
        if not prompt.strip():
            empty += 1
            continue
        if prompt in seen:
            repeated += 1
            continue
        seen.add(prompt)
        out.append(
            {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": prompt}],
                "ability": "chat",
                "reward_model": {"style": "model", "ground_truth": ""},
                "extra_info": {"split": split, "index": len(out), "prompt_id": str(row.get("prompt_id") or "")},
            }
        )
    return out, empty, repeated


def prepare(source: str, out: Path, splits: dict[str, str] | None = None, data_source: str = DEFAULT_SOURCE) -> dict:
    """Write ``out/<name>.parquet`` for each ``{name: source split}``; returns the prompts kept per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, split in (splits or SPLITS).items():
        rows, empty, repeated = to_prompt_rows(read_split(source, split), name, data_source)
        if not rows:
            raise DataError(f"{source}: the {split} split has no prompt")
        pq.write_table(pa.Table.from_pylist(rows), out / f"{name}.parquet")
        counts[name] = len(rows)
        skipped = f"{empty} empty, {repeated} repeated"
        print(f"{name}: {len(rows)} prompts from {split} -> {out / f'{name}.parquet'} (skipped: {skipped})")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="hub id or local folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--train-split", default=SPLITS["train"], help="source split for train (default: %(default)s)")
    parser.add_argument("--test-split", default=SPLITS["test"], help="source split for test, '' for none (%(default)s)")
    parser.add_argument("--data-source", default=DEFAULT_SOURCE, help="data_source column (default: %(default)s)")
    args = parser.parse_args(argv)
    splits = {"train": args.train_split, **({"test": args.test_split} if args.test_split else {})}
    try:
        prepare(args.source, args.out, splits, args.data_source)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
