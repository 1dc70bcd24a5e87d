"""FSDP2's policy loading (``sppo_lightning.loading``) on 2 CPU processes, through Lightning's ModelParallelStrategy.

Run by tests/test_loading.py in a subprocess (the strategy re-launches this script per rank):

    python tests/fsdp_loading.py compare --model DIR --out result.pt [--dtype bfloat16] [--gradient-checkpointing]
    python tests/fsdp_loading.py memory --model DIR --out memory.json [--whole]

``compare``: after ``configure_model`` (meta device, sharded, weights from rank 0), the same policy is also built the
way it was before (every rank loads the whole model, then shards it); rank 0 writes both paths' whole parameters,
buffers and the log-probs of a fixed batch, then one optimizer step runs on the loaded policy.
``memory``: each rank writes how much its peak resident memory (VmHWM) grew while ``configure_model`` ran, the bytes
of its own shards and the largest single tensor; ``--whole`` measures the path before (every rank loads the whole
model), for comparison.
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from sppo_lightning import attention, loading, sharding
from sppo_lightning.data.batching import collate
from sppo_lightning.module import SPPOModule

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_one_step import FixedBatch, fixed_rows  # noqa: E402  (beside this script)


def kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def whole_then_shard(module: SPPOModule) -> torch.nn.Module:
    """The path before ``loading``: every rank loads the whole model, then shards it."""
    h, backend = module.hparams, module.resolve_attention()
    implementation = attention.load_implementation(backend)
    source = loading.PolicySource(h.model_name_or_path, h.dtype, implementation, h.trust_remote_code)
    policy = module._prepared(source.load(), backend)
    sharding.fully_shard_policy(policy, module.device_mesh["data_parallel"], None, False)
    return policy


class Measured(SPPOModule):
    """Records the growth of this process's peak resident memory while the policy is built."""

    def __init__(self, *args, whole: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.whole = whole

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        reset_peak()
        before = kib("VmRSS")
        if self.whole:
            self.policy = whole_then_shard(self)
        else:
            super().configure_model()
        self.peak_growth = kib("VmHWM") - before
        self.shards = sum(p.to_local().numel() * p.element_size() for p in self.policy.parameters())
        self.largest = max(p.numel() * p.element_size() for p in self.policy.parameters())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


class Compare(L.Callback):
    def __init__(self, out: str):
        self.out = out

    def on_fit_start(self, trainer, module):
        rank, world = trainer.global_rank, trainer.world_size
        rows = fixed_rows()[rank * len(fixed_rows()) // world : (rank + 1) * len(fixed_rows()) // world]
        batch = collate(rows, module.tokenizer.pad_token_id)
        result = {}
        loaded = module.policy
        for name, policy in (("loaded", loaded), ("before", whole_then_shard(module))):
            module.policy = policy
            with torch.no_grad():
                logps = module.token_logps(batch)
            result[name] = {
                "params": {n: whole(p) for n, p in policy.named_parameters()},
                "buffers": {n: b.detach().clone() for n, b in policy.named_buffers()},
                "logps": trainer.strategy.all_gather(logps),  # every rank's rows
                "tied": policy.get_output_embeddings().weight is policy.get_input_embeddings().weight,
                "param_dtypes": sorted({str(p.dtype) for p in policy.parameters()}),
            }
        module.policy = loaded
        if trainer.is_global_zero:
            torch.save(result, self.out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["compare", "memory"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--whole", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    L.seed_everything(0)
    settings = dict(loss_type="sppo", eta=2.0, learning_rate=1e-3, dtype=args.dtype)
    settings["gradient_checkpointing"] = args.gradient_checkpointing
    module = Measured(args.model, whole=args.whole, **settings)
    compare = args.mode == "compare"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=1 if compare else 0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Compare(args.out)] if compare else [],
    )
    trainer.fit(module, datamodule=FixedBatch())
    if compare:
        return
    record = {"peak_growth": module.peak_growth, "shards": module.shards, "largest": module.largest}
    Path(f"{args.out}.rank{trainer.global_rank}").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
