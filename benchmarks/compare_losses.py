"""Every loss type (each ``loss.LOSSES`` entry) on the demo, same seed and budget: accuracy before -> after, time.

    python benchmarks/compare_losses.py [--epochs 20] [--out runs/compare_losses] [-- extra CLI overrides]

Each run is the real CLI in its own process (``train.py fit --config configs/demo.yaml --model.loss_type=...``);
the table is printed and written as JSON next to the runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from sppo_lightning.loss import LOSSES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from argtypes import at_least  # noqa: E402


def accuracies(root: Path) -> list[float]:
    """``val/accuracy`` of the newest run under ``root`` (a rerun into the same folder adds logs/version_N+1: the
    older runs' rows are not this run's "before")."""
    newest = max(root.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    with newest.open() as f:
        rows = list(csv.DictReader(f))
    return [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]


def run(loss_type: str, epochs: int, out: Path, extra: list[str]) -> dict:
    root = out / loss_type
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "demo.yaml")]
    cmd += [f"--model.loss_type={loss_type}", f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={root}"]
    start = time.perf_counter()
    done = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:  # the run's own message (one line for bad input), not a CalledProcessError
        sys.exit(f"{loss_type}: train.py exited {done.returncode}:\n{done.stderr[-2000:]}")
    acc = accuracies(root)
    return {"loss_type": loss_type, "before": acc[0], "after": acc[-1], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=at_least(1), default=20)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare_losses")
    parser.add_argument("--loss-types", nargs="+", default=list(LOSSES), help="default: every LOSSES entry")
    parser.add_argument("extra", nargs="*", help="more CLI overrides, after --")
    args = parser.parse_args()

    results = [run(lt, args.epochs, args.out, args.extra) for lt in args.loss_types]
    print(f"| loss_type | val/accuracy before -> after | gain | wall time ({args.epochs} iterations) |")
    print("|---|---|---|---|")
    for r in results:
        gain = 100 * (r["after"] - r["before"])
        accuracy = f"{r['before']:.1%} -> {r['after']:.1%}"
        print(f"| `{r['loss_type']}` | {accuracy} | {gain:+.1f} pts | {r['seconds']:.0f} s |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
