from sppo_lightning.rewards.base import Oracle, RuleOracle
from sppo_lightning.rewards.math import compute_score, compute_score_verl
from sppo_lightning.rewards.pairrm import PairRMOracle
from sppo_lightning.rewards.pairwise import PairClassifierOracle, PairwiseOracle
from sppo_lightning.rewards.reward_model import RewardModelOracle

__all__ = [
    "Oracle",
    "PairClassifierOracle",
    "PairRMOracle",
    "PairwiseOracle",
    "RewardModelOracle",
    "RuleOracle",
    "compute_score",
    "compute_score_verl",
]
