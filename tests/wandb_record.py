"""Reads a wandb run's offline record (``run-*.wandb``), which wandb 0.31 writes from its Go service and no longer
ships a Python reader for: a LevelDB-style log of 32 KiB blocks, each record a ``wandb_internal_pb2.Record``."""

import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # file: b":W&B", magic 0xBEE1, version; record: crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator:
    """Every record of the file, in order (records split over blocks put back together)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb record"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the end of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FIRST:
            pending = chunk
            continue
        if kind == MIDDLE:
            pending += chunk
            continue
        whole, pending = (chunk if kind == FULL else pending + chunk), b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(whole)
        yield record


def history_keys(path: Path) -> list[set[str]]:
    """The top-level keys of each logged history row (``curves`` for ``curves.filenames``, ``curves._type``...)."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or ".".join(item.nested_key)).split(".")[0] for item in record.history.item})
    return rows


def history(path: Path) -> list[dict]:
    """Each logged history row as ``{key: value}`` (values decoded from wandb's JSON; nested keys joined by dots)."""
    import json

    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            )
    return rows
