"""Oracles: what makes one response better than another. Every oracle ends in win-rates."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from sppo_lightning.errors import DataError
from sppo_lightning.preference import pairwise_from_rewards, win_rates_from_rewards
from sppo_lightning.records import PromptRecord, Rollout, Scores
from sppo_lightning.rewards.math import compute_score


class Oracle(ABC):
    """Judges a rollout: reads its prompts and response texts and returns their ``Scores`` ([P, K] rewards and
    win-rates, and how many responses it could not score).

    An oracle never changes the rollout it is given (``rollout.with_scores(scores)`` makes the scored record) and
    keeps nothing from one rollout to the next: everything it learned about a rollout is in what it returns.
    """

    min_samples: int = 1
    """Fewest responses per prompt this oracle can judge (a pairwise one needs two)."""

    @abstractmethod
    def score(self, rollout: Rollout, device: torch.device | None = None) -> Scores:
        """``device``: where a model-based oracle may run (the policy's device); rule oracles ignore it."""


def _safe_score(score_fn: Callable[[str, str], float], text: str, truth: str) -> tuple[float, str | None]:
    """The score in [0, 1], or 0.0 (a loss) and what went wrong: it raised, or gave NaN or a value outside [0, 1]."""
    try:
        value = float(score_fn(text, truth))
    except Exception as e:  # noqa: BLE001 - a user's function may raise anything on an odd response
        return 0.0, f"raised {type(e).__name__}: {e}"
    if not 0.0 <= value <= 1.0:  # also NaN
        return 0.0, f"returned {value}, not in [0, 1]"
    return value, None


def rule_scores(
    score_fn: Callable[[str, str], float],
    response_text: list[list[str]],
    records: list[PromptRecord],
    problems: list[str] | None = None,
) -> torch.Tensor:
    """``[P, K]`` values of ``score_fn(response, ground_truth)`` for every response of every prompt.

    A response the function cannot score (it raises, returns NaN or a value outside [0, 1]) scores 0.0, a loss;
    each such case is described in ``problems`` when a list is given.
    """
    scores = []
    for p, (texts, rec) in enumerate(zip(response_text, records, strict=True)):
        row = []
        for k, text in enumerate(texts):
            value, problem = _safe_score(score_fn, text, rec.ground_truth)
            if problem is not None and problems is not None:
                problems.append(f"prompt {p}, response {k}: {problem}")
            row.append(value)
        scores.append(row)
    return torch.tensor(scores, dtype=torch.float32)


class RuleOracle(Oracle):
    """A rule that checks each response against the prompt's ground truth (e.g. MATH answer correctness).

    Rewards are the rule's values; y_k beats y_j when its reward is higher, ties count ½.
    """

    def __init__(
        self,
        score_fn: Callable[[str, str], float] = compute_score,
        include_self: bool = True,
        max_unscored_share: float = 0.1,
    ):
        """
        Args:
            score_fn: ``f(response_text, ground_truth) -> float`` in [0, 1], given as an import path in YAML.
            include_self: Count each response against itself (½) in its win-rate, as the SPPO authors' code does.
            max_unscored_share: Responses ``score_fn`` cannot score (it raises, returns NaN or a value outside
                [0, 1]) score 0, are counted (``rollout/unscored``) and reported; past this share of one rollout the
                run stops. 1.0 = never stop.
        """
        self.score_fn = score_fn
        self.include_self = include_self
        self.max_unscored_share = max_unscored_share

    def score(self, rollout: Rollout, device: torch.device | None = None) -> Scores:
        problems: list[str] = []
        rewards = rule_scores(self.score_fn, rollout.response_text, rollout.prompts, problems)
        if problems:
            total = rewards.numel()
            name = getattr(self.score_fn, "__qualname__", repr(self.score_fn))
            where = f"data.oracle.init_args.score_fn ({name}): {len(problems)} of {total} responses could not be scored"
            if len(problems) > self.max_unscored_share * total:
                raise DataError(
                    f"{where}, more than data.oracle.init_args.max_unscored_share={self.max_unscored_share} "
                    f"(first: {problems[0]})"
                )
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{where} and score 0 (first: {problems[0]})")
        win_rates = win_rates_from_rewards(rewards, include_self=self.include_self)
        preferences = pairwise_from_rewards(rewards)
        return Scores(rewards=rewards, win_rates=win_rates, unscored=len(problems), preferences=preferences)
