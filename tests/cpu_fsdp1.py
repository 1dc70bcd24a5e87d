"""Lightning's FSDPStrategy on CPU processes over gloo, for tests only.

Lightning refuses ``FSDPStrategy`` with a CPU accelerator (an exact-type check) and hands FSDP1 the root device's
index, which is None on CPU, where FSDP1 wants ``device_id=cpu``. FSDP1 itself runs on CPU, so this subclass
changes only that, and CI tests the FSDP1 path (the rollout and the π_t pass through the root's forward, norm
clipping through the wrapper, sharded checkpoints, the export) the way it runs on GPUs.
"""

from unittest import mock

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel


class _FSDPOnCPU(FullyShardedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "device_id": torch.device("cpu")})


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        with mock.patch("torch.distributed.fsdp.FullyShardedDataParallel", _FSDPOnCPU):
            return super()._setup_model(model)
