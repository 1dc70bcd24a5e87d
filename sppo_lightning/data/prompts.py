"""Prompt sets: chat messages plus the ground truth the oracle checks against.

Rows are accepted in verl's parquet schema unchanged (``prompt`` = chat messages, ``reward_model.ground_truth``,
``data_source``, ``extra_info``) and in a plain form (``prompt`` or ``problem`` as a string, ``ground_truth`` or
``answer``). Rows judged by a model (``reward_model.style: model``, e.g. UltraFeedback for PairRM) may have no
ground truth. Files may be jsonl or parquet; a hub id is read with ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sppo_lightning.errors import DataError


@dataclass
class PromptRecord:
    messages: list[dict[str, str]]
    """Chat messages, the last one the user's turn."""
    ground_truth: str
    data_source: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)


def record_from_row(row: dict[str, Any], where: str) -> PromptRecord:
    """Normalise one row (verl schema or plain) into a PromptRecord; ``where`` names it in errors."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    prompt = row.get("prompt", row.get("problem"))
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in prompt]
    else:
        raise DataError(f"{where}: missing 'prompt' (a string or a list of chat messages)")
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{where}: the prompt is empty")
    reward_model = row.get("reward_model") or {}
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if truth is None:
        truth = row.get("ground_truth", row.get("answer"))
    judged = isinstance(reward_model, dict) and reward_model.get("style") == "model"  # verl: a model judges, no truth
    if (truth is None or str(truth).strip() == "") and not judged:
        raise DataError(f"{where}: missing or empty ground truth ('reward_model.ground_truth' or 'ground_truth')")
    extra = row.get("extra_info") or {}
    return PromptRecord(
        messages=messages,
        ground_truth="" if truth is None else str(truth),
        data_source=str(row.get("data_source") or ""),
        extra_info=dict(extra) if isinstance(extra, dict) else {},
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[dict, str]]:
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
            ) from None
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{path}:{lineno}"
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield row, f"{path}: row {i}"


def iter_rows(path: Path) -> Iterator[tuple[dict, str]]:
    """``(row, where)`` for each row of a jsonl or parquet file; ``where`` names file and line/row for errors."""
    return _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)


def read_prompts(source: str, split: str = "train") -> list[PromptRecord]:
    """Read a jsonl or parquet file, or a hub dataset id (``split`` picks its split)."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists() or not looks_like_hub_id(source):
        if not path.is_file():
            raise DataError(
                f"{source}: file not found" + (" (a folder; name the files in it)" if path.is_dir() else "")
            )
        records = [record_from_row(row, where) for row, where in iter_rows(path)]
    else:
        records = [record_from_row(row, f"{source}[{split}] row {i}") for i, row in enumerate(_hub_rows(source, split))]
    if not records:
        raise DataError(f"{source}: no prompts")
    return records


def looks_like_hub_id(source: str) -> bool:
    """``name`` or ``org/name`` that is not a path here: no suffix, not absolute, no ``./``, its folder not local."""
    parts = source.split("/")
    if source.startswith((".", "/", "~")) or len(parts) > 2 or Path(source).suffix:
        return False
    return not (len(parts) == 2 and Path(parts[0]).is_dir())  # data/mth: a typo'd file under a local folder


def _hub_rows(source: str, split: str):
    """The rows of a hub dataset's split; a missing ``datasets`` or an unreachable hub is one message."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f'{source}: not a file here; reading it as a hub dataset needs `pip install "sppo-lightning[datasets]"`'
        ) from None
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types (connection, not found, bad split)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{source}: not a file here, and the hub did not give it ({type(e).__name__}: {first})"
        ) from None


class PromptSource(ABC):
    """Anything that yields prompt records; subclasses are picked by ``class_path`` in the config."""

    @abstractmethod
    def load(self) -> list[PromptRecord]: ...

    def describe(self) -> str:
        """Where the prompts come from, for messages (the files for ``PromptFiles``)."""
        return type(self).__name__


class PromptFiles(PromptSource):
    """Prompts from jsonl / parquet files or a hub dataset."""

    def __init__(self, paths: str | list[str], split: str = "train", limit: int | None = None):
        """
        Args:
            paths: One or more jsonl / parquet files, or a hub dataset id.
            split: The split to read when ``paths`` is a hub dataset id.
            limit: Keep only the first ``limit`` prompts (quick experiments, evaluation subsets).
        """
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        self.split = split
        self.limit = limit

    def describe(self) -> str:
        return ", ".join(self.paths)

    def load(self) -> list[PromptRecord]:
        records = [r for p in self.paths for r in read_prompts(p, self.split)]
        return records[: self.limit] if self.limit is not None else records
