"""One iteration of SPPOModule on fixed groups (``tests/test_step_gradient.py``'s rollout, K = 2), single-process or
FSDP2 / FSDP1 over N CPU processes; each rank writes what its optimizer steps were.

Run by tests/test_steps.py in a subprocess (the strategy re-launches this script per rank):

    python tests/steps_fit.py --devices 2 --out result [--groups 16] [--rows-per-step 8] [--micro-batch-size 2]
        [--max-tokens 60] [--loss-type dpo --tie-rank 1] [--accumulate 2 --nan-at 1] [--fsdp1]

``--tie-rank R``: every response on rank R gets the same reward (under DPO/IPO all its groups drop out).
``--nan-at I``: a NaN target in the I-th micro-batch of every optimizer step (a NaN loss).
Writes ``<out>.rank<r>.json``: global_step, the real rows and the fillers of each step, skipped steps, whether this
rank's parameters changed (their indices).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: `tests` and `sppo_lightning`

import lightning as L  # noqa: E402
import torch  # noqa: E402

from sppo_lightning.module import SPPOModule  # noqa: E402
from sppo_lightning.preference import win_rates_from_rewards  # noqa: E402
from sppo_lightning.records import Scores  # noqa: E402
from sppo_lightning.toy import MODEL_DIR  # noqa: E402
from tests.test_step_gradient import FixedRewards, FixedRollout, fixed_groups  # noqa: E402


class TieOnRank(FixedRewards):
    """The fixed rewards, except on one rank, where every response ties."""

    def __init__(self, groups, rank: int | None):
        super().__init__(groups)
        self.rank = rank

    def score(self, rollout, device=None):
        scores = super().score(rollout, device)
        if self.rank is None or torch.distributed.get_rank() != self.rank:
            return scores
        rewards = torch.zeros_like(scores.rewards)
        return Scores(rewards=rewards, win_rates=win_rates_from_rewards(rewards))


class Steps(L.Callback):
    """Per optimizer step: the real rows and the fillers it ran on this rank; a NaN target where asked."""

    def __init__(self, nan_at: int | None):
        self.nan_at, self.steps, self.current = nan_at, [], {"rows": 0, "fillers": 0}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.current["rows"] += int(batch.row_weight.sum())
        self.current["fillers"] += int(batch.filler)
        if self.nan_at is not None and batch_idx % trainer.accumulate_grad_batches == self.nan_at:
            batch.targets[0] = float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(self.current)
        self.current = {"rows": 0, "fillers": 0}


def whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter's values, comparable at any time: FSDP2 leaves its root unsharded after a forward (a plain tensor
    then, a DTensor shard later), so DTensors are gathered (a collective: every rank calls it); FSDP1's flat shards
    are compared as they are."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--rows-per-step", type=int)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--loss-type", default="sppo")
    parser.add_argument("--tie-rank", type=int)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--nan-at", type=int)
    parser.add_argument("--fsdp1", action="store_true")
    args = parser.parse_args()

    L.seed_everything(0)
    module = SPPOModule(str(MODEL_DIR), loss_type=args.loss_type, eta=2.0, learning_rate=1e-3, weight_decay=0.0)
    from cpu_fsdp1 import cpu_strategy, cpu_trainer  # beside this script

    steps = Steps(args.nan_at)
    trainer = cpu_trainer(
        args.devices, cpu_strategy(args.devices, args.fsdp1), [steps], max_epochs=1,
        reload_dataloaders_every_n_epochs=1, accumulate_grad_batches=args.accumulate,
    )  # fmt: skip
    groups = fixed_groups(args.groups)
    step = {} if args.rows_per_step is None else {"rows_per_step": args.rows_per_step}  # None: as before the setting
    data = FixedRollout(
        groups, eta=2.0, loss_type=args.loss_type, micro_batch_size=args.micro_batch_size,
        max_tokens_per_micro_batch=args.max_tokens, **step,
    )  # fmt: skip
    data.oracle = TieOnRank(groups, args.tie_rank)
    before = None

    class Before(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = [whole(p) for p in pl_module.parameters()]

    trainer.callbacks.append(Before())
    trainer.fit(module, datamodule=data)
    after = [whole(p) for p in module.parameters()]
    result = {
        "global_step": trainer.global_step,
        "steps": steps.steps,
        "skipped_steps": module.guard.skipped_steps,
        "changed": [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if not torch.equal(a, b)],
        "finite": all(bool(torch.isfinite(a).all()) for a in after),
        "metrics": {k: float(v) for k, v in data.rollout_metrics.items() if k.startswith("rollout/")},
    }
    Path(f"{args.out}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
