"""Oracles: what makes one response better than another. Every oracle ends in win-rates."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sppo_lightning.preference import win_rates_from_rewards
from sppo_lightning.rewards.math import compute_score
from sppo_lightning.rollout.base import Rollout

if TYPE_CHECKING:  # a type only: the data layer imports rewards, not the other way round
    from sppo_lightning.data.prompts import PromptRecord


class Oracle(ABC):
    """Scores a rollout in place: sets ``rollout.rewards`` [P, K] and ``rollout.win_rates`` [P, K]."""

    min_samples: int = 1
    """Fewest responses per prompt this oracle can judge (a pairwise one needs two)."""

    @abstractmethod
    def score(self, rollout: Rollout, device: torch.device | None = None) -> None:
        """``device``: where a model-based oracle may run (the policy's device); rule oracles ignore it."""


def rule_scores(
    score_fn: Callable[[str, str], float], response_text: list[list[str]], records: list[PromptRecord]
) -> torch.Tensor:
    """``[P, K]`` values of ``score_fn(response, ground_truth)`` for every response of every prompt."""
    scores = [
        [float(score_fn(text, rec.ground_truth)) for text in texts]
        for texts, rec in zip(response_text, records, strict=True)
    ]
    return torch.tensor(scores, dtype=torch.float32)


class RuleOracle(Oracle):
    """A rule that checks each response against the prompt's ground truth (e.g. MATH answer correctness).

    Rewards are the rule's values; y_k beats y_j when its reward is higher, ties count ½.
    """

    def __init__(self, score_fn: Callable[[str, str], float] = compute_score, include_self: bool = True):
        """
        Args:
            score_fn: ``f(response_text, ground_truth) -> float``, given as an import path in YAML.
            include_self: Count each response against itself (½) in its win-rate, as the SPPO authors' code does.
        """
        self.score_fn = score_fn
        self.include_self = include_self

    def score(self, rollout: Rollout, device: torch.device | None = None) -> None:
        rollout.rewards = rule_scores(self.score_fn, rollout.response_text, rollout.prompts)
        rollout.win_rates = win_rates_from_rewards(rollout.rewards, include_self=self.include_self)
