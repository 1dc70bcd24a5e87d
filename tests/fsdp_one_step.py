"""One optimizer step of SPPOModule on a fixed batch, single-process or FSDP2 over N CPU processes.

Run by tests/test_fsdp.py in a subprocess (Lightning's ModelParallelStrategy re-launches this script per rank):

    python tests/fsdp_one_step.py --devices 2 --out result.pt [--fsdp1] [--weight-decay 0.01] [--packed] [--uneven]
        [--checkpointing] [--no-share-prompt]

The global batch is the same whatever the process count: ROWS rows split evenly, each rank one contiguous shard
(``--uneven``: 12 rows on rank 0, 4 on rank 1, as when DPO drops all-tie groups on one rank). ``--packed`` trains on
packed rows (``SPPOModule(packed=True)``); ``--checkpointing`` with gradient checkpointing; ``--no-share-prompt`` packs
whole rows instead of each prompt once.
Writes the mean first-step loss over ranks, the whole gradients of that step and the full parameters after it
(rank 0), and the names of the parameters in AdamW's decayed and spared groups. ``--fsdp1`` shards with
Lightning's FSDPStrategy (FSDP1, tests/cpu_fsdp1.py) instead of FSDP2; it writes the loss and the groups only
(FSDP1's whole-state gathering crashes on CPU).
"""

import argparse
import random

import lightning as L
import torch

from sppo_lightning.data.batching import attach_step_units, collate
from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.data.examples import Example
from sppo_lightning.module import SPPOModule
from sppo_lightning.toy import MODEL_DIR

ROWS = 16  # the global batch


def fixed_rows() -> list[Example]:
    rng = random.Random(0)
    rows = []
    for i in range(ROWS):
        if i % 4 == 0:  # groups of 4 responses to one prompt, as a rollout makes them (the prompt's KV is shared)
            prompt = [rng.randrange(3, 200) for _ in range(rng.randrange(4, 9))]
        response = [rng.randrange(3, 200) for _ in range(rng.randrange(2, 7))]
        win_rate = rng.random()
        rows.append(Example(prompt, response, 0.0, win_rate, 2.0 * (win_rate - 0.5), i // 4))
    return rows


class FixedBatch(L.LightningDataModule):
    def __init__(self, uneven: bool = False):
        super().__init__()
        self.uneven = uneven

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        bounds = [0, 12, ROWS] if self.uneven and world == 2 else [ROWS * r // world for r in range(world + 1)]
        module = self.trainer.lightning_module
        batch = collate(fixed_rows()[bounds[rank] : bounds[rank + 1]], module.tokenizer.pad_token_id)
        RolloutDataModule.attach_ref_logps(module, [batch])
        strategy = self.trainer.strategy

        def all_ranks_sum(t):
            return strategy.all_gather(t.to(strategy.root_device)).sum(0).cpu() if world > 1 else t

        attach_step_units([batch], 1, all_ranks_sum=all_ranks_sum)
        return torch.utils.data.DataLoader([batch], batch_size=None)


class Record(L.Callback):
    def __init__(self, whole_grads: bool = True):
        self.losses = []
        self.grads = {}
        self.whole_grads = whole_grads  # FSDP1's are flat local shards

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.whole_grads:
            return
        for name, p in pl_module.policy.named_parameters():  # whole gradients: a collective for DTensor shards
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            self.grads[name] = grad.detach().cpu().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach()
        self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--fsdp1", action="store_true")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--uneven", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--no-share-prompt", action="store_true")
    args = parser.parse_args()

    L.seed_everything(0)
    module = SPPOModule(
        str(MODEL_DIR), loss_type="sppo", eta=2.0, learning_rate=1e-3, weight_decay=args.weight_decay,
        fsdp_cpu_offload=args.cpu_offload, packed=args.packed, gradient_checkpointing=args.checkpointing,
        share_prompt=not args.no_share_prompt,
    )  # fmt: skip
    from cpu_fsdp1 import cpu_strategy, cpu_trainer  # beside this script, whose folder is on sys.path

    record = Record(whole_grads=not args.fsdp1)
    trainer = cpu_trainer(args.devices, cpu_strategy(args.devices, args.fsdp1), [record], max_steps=1)
    trainer.fit(module, datamodule=FixedBatch(args.uneven))
    groups = {"decay_names": module.decay_names, "loss": record.losses[0]}
    if args.fsdp1:
        if trainer.is_global_zero:
            torch.save(groups, args.out)
        return
    sharded = any(type(p).__name__ == "DTensor" for p in module.policy.parameters())
    params = module.full_policy_state_dict()
    if trainer.is_global_zero:
        torch.save({**groups, "grads": record.grads, "params": params, "sharded": sharded}, args.out)


if __name__ == "__main__":
    main()
