from sppo_lightning.rewards.base import Oracle, RuleOracle
from sppo_lightning.rewards.math import compute_score

__all__ = ["Oracle", "RuleOracle", "compute_score"]
