"""Write MATH as verl-schema parquet: ``python -m sppo_lightning.data.prepare_math --source SRC --out DIR``.

SRC is one of
- a hub id (default: the lighteval copy of MATH that verl uses), read with ``datasets.load_dataset``;
- a folder in the original MATH layout, ``train/<subject>/<n>.json`` and ``test/<subject>/<n>.json``;
- a folder holding ``train`` and ``test`` as ``.jsonl`` or ``.parquet`` files with the same columns
  (``problem``, ``level``, ``type``, ``solution``).

Each row of ``DIR/train.parquet`` and ``DIR/test.parquet`` has ``data_source``, ``prompt`` (one user turn: the
problem followed by the instruction below), ``ability``, ``reward_model`` = {style: rule, ground_truth: the last
``\\boxed{}`` of the solution} and ``extra_info`` (split, index, level, subject). Problems whose solution has no
boxed answer are reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sppo_lightning.data.prompts import iter_rows
from sppo_lightning.errors import DataError
from sppo_lightning.rewards.math import extract_answer

DEFAULT_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
SPLITS = ("train", "test")


Rows = list[tuple[dict, str]]
"""``(row, where)`` pairs: a raw MATH problem and the file/line or hub row it came from."""


def _read_folder_split(root: Path, split: str) -> Rows:
    """One split from a folder: MATH's ``split/<subject>/<n>.json`` layout or ``split.jsonl|parquet``."""
    if (root / split).is_dir():
        rows = []
        for path in sorted(
            (root / split).glob("*/*.json"), key=lambda p: (p.parent.name, int(p.stem) if p.stem.isdigit() else p.stem)
        ):
            try:
                rows.append((json.loads(path.read_text(encoding="utf-8")), str(path)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg})") from None
        return rows
    for suffix in (".jsonl", ".parquet"):
        if (root / f"{split}{suffix}").is_file():
            return list(iter_rows(root / f"{split}{suffix}"))
    raise DataError(
        f"{root}: no '{split}' split (expected {split}/<subject>/<n>.json, {split}.jsonl or {split}.parquet)"
    )


def read_source(source: str) -> dict[str, Rows]:
    """The raw MATH rows of each split."""
    root = Path(source)
    if root.exists():
        if not root.is_dir():
            raise DataError(f"{source}: expected a folder with a train and a test split, or a hub dataset id")
        return {split: _read_folder_split(root, split) for split in SPLITS}
    try:
        import datasets
    except ImportError:
        raise DataError(
            f'{source}: not a local folder; reading it from the hub needs `pip install "sppo-lightning[datasets]"`, '
            "or give a local copy of MATH with --source path/to/MATH"
        ) from None
    try:
        ds = datasets.load_dataset(source)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types (no network, not found, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{source}: not a local folder, and the hub did not give it ({type(e).__name__}: {first}); without "
            "network, give a local copy of MATH with --source path/to/MATH"
        ) from None
    return {split: [(dict(r), f"{source}[{split}] row {i}") for i, r in enumerate(ds[split])] for split in SPLITS}


def to_verl_rows(rows: Rows, split: str, data_source: str) -> tuple[list[dict], list[str]]:
    """verl-schema rows, and where each skipped problem (no boxed answer) came from."""
    out, skipped = [], []
    for row, where in rows:
        missing = [c for c in ("problem", "solution") if not str(row.get(c) or "").strip()]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        answer = extract_answer(row["solution"])
        if answer is None or not answer.strip():
            skipped.append(where)
            continue
        out.append(
            {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": f"{row['problem']} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {
                    "split": split,
                    "index": len(out),
                    "level": str(row.get("level") or ""),
                    "subject": str(row.get("type") or ""),
                },
            }
        )
    return out, skipped


def prepare(source: str, out: Path, data_source: str = DEFAULT_SOURCE) -> dict[str, int]:
    """Write ``out/train.parquet`` and ``out/test.parquet``; returns the problems kept per split.

    ``data_source`` defaults to the name verl routes its MATH scorer on.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = read_source(source)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        rows, skipped = to_verl_rows(raw[split], split, data_source)
        for where in skipped:
            print(f"skipped (no \\boxed answer in the solution): {where}", file=sys.stderr)
        if not rows:
            raise DataError(f"{source}: the {split} split has no problem with a boxed answer")
        pq.write_table(pa.Table.from_pylist(rows), out / f"{split}.parquet")
        counts[split] = len(rows)
        print(f"{split}: {len(rows)} problems -> {out / f'{split}.parquet'} ({len(skipped)} skipped)")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="hub id or local folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--data-source", default=DEFAULT_SOURCE, help="data_source column (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        prepare(args.source, args.out, args.data_source)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
