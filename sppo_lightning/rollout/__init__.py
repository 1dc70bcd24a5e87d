from sppo_lightning.rollout.base import PolicyHandle, Rollout, RolloutEngine, Samples, SamplingParams
from sppo_lightning.rollout.hf import HFEngine

__all__ = ["HFEngine", "PolicyHandle", "Rollout", "RolloutEngine", "Samples", "SamplingParams"]
