"""What a resumed run did before: the rows its earlier parts wrote to ``metrics.csv``, for the summary and curves.

A resume writes a new ``logs/version_N``; the iterations before it are in earlier versions. Walking back from the
newest earlier version, each contributes the rows before the first epoch already covered, until the row of the
accuracy measured before any update (epoch -1) is found: the chain of one run, not other runs in the same folder.
"""

from __future__ import annotations

import csv
from pathlib import Path


def _version_number(path: Path) -> int:
    try:
        return int(path.name.removeprefix("version_"))
    except ValueError:
        return -1


def _epoch(row: dict) -> int | None:
    try:
        return int(float(row.get("epoch") or ""))
    except ValueError:
        return None


def earlier_rows(trainer) -> list[dict]:
    """Rows of the earlier parts of a resumed run, oldest first (empty for a run that did not resume)."""
    if not trainer.ckpt_path:
        return []
    logger = next((lg for lg in trainer.loggers if type(lg).__name__ == "CSVLogger"), None)
    if logger is None or not isinstance(logger.version, int):
        return []
    root = Path(logger.root_dir)
    earlier = sorted(
        (p for p in root.glob("version_*") if -1 < _version_number(p) < logger.version), key=_version_number
    )
    need = trainer.current_epoch  # the first iteration this part runs
    chain: list[list[dict]] = []
    for folder in reversed(earlier):
        path = folder / "metrics.csv"
        if not path.is_file():
            continue
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if (e := _epoch(r)) is not None and e < need]
        if not rows:
            continue
        chain.append(rows)
        need = min(_epoch(r) for r in rows)
        if need < 0:  # the accuracy before any update: the run's beginning
            break
    return [row for rows in reversed(chain) for row in rows]


def values(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of every row that carries ``name``."""
    return [(_epoch(r), float(r[name])) for r in rows if r.get(name) not in (None, "")]
