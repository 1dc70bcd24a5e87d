"""``benchmarks/gpu_check.py --dry-run``: the prepared GPU check's code path on CPU at a tiny size, as the suite can
run it. What is asserted is the table's shape (its columns and one line per row, ``n/a`` where only CUDA can
measure), not its figures, and that the check runs again in the same folder (the model and data are reused, the
runs replaced). The figures themselves come from a GPU: ``tests/test_gpu.py`` runs the real check there."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests import forked
from tests.test_cli import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(gpu_check)  # benchmarks/ is not a package: loaded by path, sys.path left alone
COLUMNS, ROWS = gpu_check.COLUMNS, gpu_check.ROWS

CUDA_ONLY = ["peak GiB", "plan GiB", "MFU"]


def check(*args: str) -> subprocess.CompletedProcess:
    return forked.run([str(REPO / "benchmarks" / "gpu_check.py"), *args], timeout=1200)


def table(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
def test_dry_run_prints_the_table_and_runs_twice(tmp_path):
    first = check("--dry-run", "--work", str(tmp_path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    header, *rows = table(first.stdout)
    assert header == COLUMNS
    assert [r[0] for r in rows] == [row.name for row in ROWS]  # one line per row, in order
    for cells in rows:
        assert all(cells[COLUMNS.index(c)] == "n/a" for c in CUDA_ONLY)  # no CUDA figures on CPU
        if cells[1] == "varlen_attn":
            assert cells[-1] == "n/a: CUDA only"
        else:  # ran: a throughput and a verdict were printed
            assert cells[COLUMNS.index("train tok/s")] != "n/a" and cells[-1] == "yes"
    record = json.loads((tmp_path / "table.json").read_text())
    assert record["columns"] == COLUMNS and len(record["cells"]) == len(ROWS)

    again = check("--dry-run", "--work", str(tmp_path), "--rows", ROWS[1].name)  # same folder: reused, replaced
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [r[0] for r in table(again.stdout)[1:]] == [ROWS[1].name]
