"""From a scored rollout to training micro-batches: which responses train, with which targets.

A *group* is the set of rows that come from one prompt and must land in the same micro-batch: all K responses, or
for a paired loss type (``LOSSES[name].paired``: ``sppo_pair``, ``dpo``, ``ipo``) the winner then the loser.
Micro-batches are made of whole groups, shuffled as groups, so group membership survives shuffling. Which rows, which
targets and which prompts are skipped is read off the loss type's entry in ``loss.LOSSES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sppo_lightning.loss import LOSSES
from sppo_lightning.records import Rollout


@dataclass
class Example:
    """One training row: a prompt, one of its responses, and what the loss needs to know about it."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    win_rate: float
    target: float
    """The log-ratio the SPPO losses regress onto: η(P̂ − ½), or η(r − SoftMean_η(r)) for ``sppo_softmean``; 0 for a
    loss type without a target (``dpo``, ``ipo``)."""
    group: int
    ref_logps: list[float] | None = None
    """log π_t(y_t | x, y_<t) of each response token when the rollout supplied them."""
    sampler_logps: list[float] | None = None
    """The sampler's own log-probs of the response tokens, when the engine reported them (for the gap check)."""
    preferences: list[float] | None = None
    """P(y ≻ y_j | x) against each of the prompt's K responses (its row of ``Rollout.preferences``), when known."""


def build_groups(
    rollout: Rollout, loss_type: str, eta: float, rewards_all: torch.Tensor | None = None
) -> list[list[Example]]:
    """Select the rows ``loss_type`` trains on (all K, or winner then loser) and attach its targets.

    ``rewards_all`` is every rank's rewards for the batch-wide softmean baseline (defaults to this rollout's).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {tuple(LOSSES)}, got {loss_type!r}")
    spec = LOSSES[loss_type]
    rewards, win_rates = rollout.rewards, rollout.win_rates
    if spec.needs_preferences and rollout.preferences is None:
        from sppo_lightning.errors import ConfigError

        raise ConfigError(
            f"model.loss_type={loss_type} regresses on the oracle's K x K preference matrix, and data.oracle gave none "
            "(an oracle returns it as Scores.preferences; the shipped ones all do)"
        )
    preferences = None if rollout.preferences is None else rollout.preferences.cpu()
    if spec.target is None:
        targets = torch.zeros_like(win_rates)
    else:
        targets = spec.target(rewards, win_rates, eta, rewards_all)
    groups = []
    for p in range(rollout.num_prompts):
        if spec.paired:
            # Winner: the first of the best; loser: the last of the worst, so that they are two different
            # responses even when all K tie (sppo_pair then regresses both onto 0, DPO skips the group).
            k = rollout.group_size
            win, lose = int(win_rates[p].argmax()), k - 1 - int(win_rates[p].flip(0).argmin())
            if spec.skips_ties and win_rates[p, win] == win_rates[p, lose]:
                continue  # all K tie: no preference to learn from
            keep = [win, lose]
        else:
            keep = range(rollout.group_size)
        groups.append(
            [
                Example(
                    prompt_ids=rollout.prompt_ids[p],
                    response_ids=rollout.response_ids[p][k],
                    reward=float(rewards[p, k]),
                    win_rate=float(win_rates[p, k]),
                    target=float(targets[p, k]),
                    group=p,
                    ref_logps=None if rollout.response_logprobs is None else rollout.response_logprobs[p][k],
                    sampler_logps=None if rollout.sampler_logprobs is None else rollout.sampler_logprobs[p][k],
                    preferences=None if preferences is None else preferences[p, k].tolist(),
                )
                for k in keep
            ]
        )
    return groups
