"""SPPO objectives and the iterative DPO and IPO baselines: pure tensor functions, no state, torch only.

Notation: for a prompt x and a response y, ``logps`` are sequence log-probabilities log π(y|x) summed over the
response tokens; ``ref`` is π_t, the policy at the start of the iteration; P̂(y ≻ π_t | x) is the estimated
win-rate of y against π_t; η is the step size of the multiplicative-weights update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sppo", "sppo_pair", "sppo_softmean", "dpo", "ipo")
"""Every ``model.loss_type``."""
PAIR_LOSSES = ("sppo_pair", "dpo", "ipo")
"""The loss types that train on a winner and a loser per prompt (rows alternate winner, loser)."""


def sppo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, win_rates: torch.Tensor, eta: float) -> torch.Tensor:
    """Per-sample SPPO loss, no reduction (Wu et al. 2024, eq. 3.6).

        ℓ(y) = ( log π_θ(y|x) / π_t(y|x) − η · (P̂(y ≻ π_t | x) − ½) )²

    The normaliser log Z_πt(x) of the exact update is approximated by η/2, which is what the ½ stands for.
    """
    return (policy_logps - ref_logps - eta * (win_rates - 0.5)) ** 2


def sppo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_win_rates: torch.Tensor,
    rejected_win_rates: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """SPPO on the winner and the loser of each group, as in the authors' code: the mean of their two
    squared terms of eq. 3.6 (each with its own soft win-rate), no reduction."""
    chosen = sppo_loss(policy_chosen_logps, ref_chosen_logps, chosen_win_rates, eta)
    rejected = sppo_loss(policy_rejected_logps, ref_rejected_logps, rejected_win_rates, eta)
    return (chosen + rejected) / 2


def softmean(x: torch.Tensor, beta: float, dim: int = -1) -> torch.Tensor:
    """SoftMean_β(x) = (1/β) · log( (1/n) Σ_i exp(β x_i) ) along ``dim``; the arithmetic mean at β = 0.

    It moves from the mean (β → 0) to the max (β → ∞); logsumexp keeps it stable for large β.
    """
    if beta == 0:
        return x.mean(dim=dim)
    # Centred on the mean and in float64: for small β the correction term is O(β·var) and would otherwise be
    # lost to cancellation before the division by β.
    x64 = x.double()
    mean = x64.mean(dim=dim, keepdim=True)
    correction = (torch.logsumexp(beta * (x64 - mean), dim=dim) - math.log(x.size(dim))) / beta
    return (mean.squeeze(dim) + correction).to(x.dtype)


def softmean_targets(rewards: torch.Tensor, eta: float, pool: torch.Tensor | None = None) -> torch.Tensor:
    """The seed recipe's regression target η · (r − SoftMean_η(r)), elementwise over ``rewards``.

    The baseline is one number taken over the whole rollout batch ``pool`` (every rank's rewards; by default
    ``rewards`` itself). It stands in for η(P̂ − ½) when a prompt has a single sample and no win-rate exists:
    SoftMean_η(r) plays the role of the normaliser log Z_πt / η, estimated from the batch.
    """
    pool = rewards if pool is None else pool
    return eta * (rewards - softmean(pool.flatten(), eta, dim=0))


def sppo_target_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The regression every SPPO variant shares, ( log π_θ/π_t − target )², with a precomputed target."""
    return (policy_logps - ref_logps - targets) ** 2


def trust_region_logps(
    token_logps: torch.Tensor, ref_token_logps: torch.Tensor, targets: torch.Tensor, clip_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_θ(y|x) = Σ_t log π_θ(y_t | x, y_<t), ``[B, R] -> [B]``, for the regression onto ``targets`` with a
    per-token trust region: PPO's clip (Schulman et al. 2017, eq. 7) applied to eq. 3.6.

    The squared loss pushes every token of a row the same way, up while log π_θ/π_t < target and down while above
    it. A token whose ratio π_θ/π_t has already left [1 − ε, 1 + ε] in that direction stops receiving gradient, so
    that a row reaches its target by moving many tokens a little rather than a few a lot (the regression alone
    bounds only their sum). This is what lets a large η and a second pass over a rollout help (README,
    Performance). Only the gradient changes; the value is the plain sum. Also returns the mask of the tokens held
    back.
    """
    log_ratio = (token_logps - ref_token_logps).detach()
    raise_row = (log_ratio.sum(-1) < targets)[:, None]
    held = torch.where(raise_row, log_ratio > math.log1p(clip_ratio), log_ratio < math.log1p(-clip_ratio))
    return torch.where(held, token_logps.detach(), token_logps).sum(-1), held


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), no reduction; iterated with π_t as reference it is the SPPO paper's
    main baseline:

        ℓ = −log σ( β · [ log π_θ(y_w|x)/π_t(y_w|x) − log π_θ(y_l|x)/π_t(y_l|x) ] )
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17), no reduction; iterated with π_t as reference it is the SPPO paper's other
    baseline:

        h = log π_θ(y_w|x)/π_t(y_w|x) − log π_θ(y_l|x)/π_t(y_l|x),    ℓ = ( h − 1/(2τ) )²

    A regression of the margin onto 1/(2τ) rather than DPO's push towards +∞, so it keeps regularising when the
    preference is deterministic. The module passes log-probs averaged over each response's tokens, as TRL's
    ``loss_type="ipo"`` does (its authors confirmed that normalisation with IPO's authors); the function itself
    takes whatever log-probs it is given.
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return (margin - 1 / (2 * tau)) ** 2


def loss_weights(row_weight: torch.Tensor, paired: bool) -> torch.Tensor:
    """Which loss terms count in a step's mean, ``[B] -> [B]`` or ``[B/2]`` for the pair losses (rows alternate
    winner, loser): a row's term when its ``row_weight`` is 1 (0 for an empty response, as verl masks them, and
    for filler rows), a pair's when both of its rows count."""
    return row_weight[0::2] * row_weight[1::2] if paired else row_weight
