"""One FSDP1 step of SPPOModule under ``bf16-mixed`` on 2 CPU processes (tests/cpu_fsdp1.py), recording precisions.

Run by tests/test_sharding.py in a subprocess (Lightning re-launches this script per rank):

    python tests/fsdp1_precision.py --out result.json

Writes (rank 0) the dtype of the rotary ``inv_freq`` buffer after the step, the dtypes of the gradients FSDP1 sent
to its reduce-scatter (observed on the real call), and the dtype the decoder layers computed in.
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch.distributed as dist

from sppo_lightning.module import SPPOModule
from sppo_lightning.toy import MODEL_DIR

sys.path.insert(0, str(Path(__file__).parent))
from cpu_fsdp1 import CPUFSDPStrategy, cpu_trainer  # noqa: E402  (beside this script)
from fsdp_one_step import FixedBatch  # noqa: E402

reduced_dtypes: set[str] = set()
# FSDP1 reduce-scatters each flat gradient through torch.distributed (looked up at call time): reduce_scatter_single
# in recent torch, reduce_scatter_tensor before
REDUCE_SCATTERS = [name for name in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, name)]


def observe(name: str) -> None:
    """Wrap the real collective ``name`` to record the dtype of what it reduces."""
    real = getattr(dist, name)

    def reduce_scatter(output, input, *args, **kwargs):
        reduced_dtypes.add(str(input.dtype))
        return real(output, input, *args, **kwargs)

    setattr(dist, name, reduce_scatter)


class Record(L.Callback):
    def __init__(self):
        self.compute_dtypes: set[str] = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        def hook(layer, args, output):
            self.compute_dtypes.add(str(output[0].dtype if isinstance(output, tuple) else output.dtype))

        module.policy.model.layers[0].mlp.register_forward_hook(hook)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    for name in REDUCE_SCATTERS:
        observe(name)

    L.seed_everything(0)
    module = SPPOModule(str(MODEL_DIR), loss_type="sppo", eta=2.0, learning_rate=1e-3)
    record = Record()
    trainer = cpu_trainer(2, CPUFSDPStrategy(), [record], precision="bf16-mixed", max_steps=1)  # fsdp1.yaml's
    trainer.fit(module, datamodule=FixedBatch())
    rotary = module.policy.model.rotary_emb
    result = {
        "inv_freq": str(rotary.inv_freq.dtype),
        "reduced": sorted(reduced_dtypes),
        "compute": sorted(record.compute_dtypes),
    }
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
