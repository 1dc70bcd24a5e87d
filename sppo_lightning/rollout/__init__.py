from sppo_lightning.rollout.base import Rollout, RolloutEngine, SamplingParams
from sppo_lightning.rollout.hf import HFEngine

__all__ = ["HFEngine", "Rollout", "RolloutEngine", "SamplingParams"]
