"""Lightning's FSDPStrategy on CPU processes over gloo, for tests only.

Lightning refuses ``FSDPStrategy`` with a CPU accelerator (an exact-type check) and hands FSDP1 the root device's
index, which is None on CPU, where FSDP1 wants ``device_id=cpu``. FSDP1 itself runs on CPU, so this subclass
changes only that, and CI tests the FSDP1 path (the rollout and the π_t pass through the root's forward, norm
clipping through the wrapper, sharded checkpoints, the export) the way it runs on GPUs.
"""

from unittest import mock

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FullyShardedDataParallel


class _FSDPOnCPU(FullyShardedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "device_id": torch.device("cpu")})


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        with mock.patch("torch.distributed.fsdp.FullyShardedDataParallel", _FSDPOnCPU):
            return super()._setup_model(model)


def cpu_strategy(devices: int, fsdp1: bool = False):
    """What the subprocess test scripts train under: FSDP1 (``CPUFSDPStrategy``), FSDP2 over ``devices``
    processes (ranks started by ``tests/forked.py``, or else by Lightning's launcher), or one process."""
    if fsdp1:
        return CPUFSDPStrategy()
    if devices > 1:
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return "auto"


def cpu_trainer(devices: int, strategy, callbacks: list, **settings) -> L.Trainer:
    """The scripts' Trainer: CPU, no logger, checkpoint, progress bar, summary or validation; ``settings`` add the
    script's own (steps, epochs, precision, accumulation)."""
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks, **settings,
    )  # fmt: skip
