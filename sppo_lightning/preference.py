"""Win-rates P̂(y_k ≻ π_t | x) of each of K responses against the policy that sampled them, torch only.

The K samples of a prompt are themselves draws from π_t, so the win-rate of y_k against π_t is estimated by
its mean preference over the group (Wu et al. 2024, §3.3). ``include_self`` keeps y_k in its own group,
scoring ½ against itself, as the authors' code does; without it the mean runs over the K − 1 others.
All functions take ``[P, K]`` (or ``[P, K, K]``) and return ``[P, K]``.
"""

from __future__ import annotations

import torch


def symmetrized(probs: torch.Tensor) -> torch.Tensor:
    """``[P, K, K] -> [P, K, K]``: P(i ≻ j) ← (P(i ≻ j) + 1 − P(j ≻ i)) / 2, ½ on the diagonal, so that an oracle's
    position bias cancels and P(i ≻ j) + P(j ≻ i) = 1 (the matrix the Nash-learning losses regress on)."""
    if probs.dim() != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(f"expected probs of shape [P, K, K], got {tuple(probs.shape)}")
    sym = (probs + 1 - probs.transpose(1, 2)) / 2
    return sym.masked_fill(torch.eye(probs.shape[-1], dtype=torch.bool, device=probs.device), 0.5)


def pairwise_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """``[P, K] -> [P, K, K]``: P(y_i ≻ y_j) = σ(s_i − s_j), Bradley-Terry on scalar scores."""
    return symmetrized(torch.sigmoid(scores[:, :, None] - scores[:, None, :]))


def pairwise_from_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """``[P, K] -> [P, K, K]``: 1 when r_i > r_j, ½ on a tie, 0 otherwise."""
    diff = rewards[:, :, None] - rewards[:, None, :]
    return symmetrized((diff > 0).to(rewards.dtype) + 0.5 * (diff == 0).to(rewards.dtype))


def win_rates_from_pairwise(probs: torch.Tensor, include_self: bool = True) -> torch.Tensor:
    """From a matrix ``probs[p, i, j] = P(y_i ≻ y_j | x_p)``: P̂_i = mean_j probs[i, j].

    The matrix is symmetrised first, P(i ≻ j) ← (P(i ≻ j) + 1 − P(j ≻ i)) / 2, so that an oracle's position bias
    cancels, and its diagonal is set to ½. Intransitive preferences need nothing special: each response's
    win-rate is its average over the actual opponents.
    """
    sym = symmetrized(probs)
    k = probs.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=probs.device)
    if include_self:
        return sym.mean(dim=-1)
    if k < 2:
        raise ValueError("include_self=False needs at least 2 responses per prompt")
    return sym.masked_fill(eye, 0.0).sum(dim=-1) / (k - 1)


def win_rates_from_scores(scores: torch.Tensor, include_self: bool = True) -> torch.Tensor:
    """From scalar scores under the Bradley-Terry model: P(y_k ≻ y_j) = σ(s_k − s_j); P̂_k = mean_j of that."""
    return win_rates_from_pairwise(pairwise_from_scores(scores), include_self)


def win_rates_from_rewards(rewards: torch.Tensor, include_self: bool = True) -> torch.Tensor:
    """From rule rewards (e.g. 1 correct / 0 wrong): y_k beats y_j when r_k > r_j, ties count ½.

    P̂_k = mean_j ( 1[r_k > r_j] + ½ · 1[r_k = r_j] ).
    """
    return win_rates_from_pairwise(pairwise_from_rewards(rewards), include_self)
