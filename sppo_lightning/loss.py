"""SPPO objectives and the iterative DPO and IPO baselines: pure tensor functions, no state, torch only; and the loss
types, one entry each (``LOSSES``).

Notation: for a prompt x and a response y, ``logps`` are sequence log-probabilities log π(y|x) summed over the
response tokens; ``ref`` is π_t, the policy at the start of the iteration; P̂(y ≻ π_t | x) is the estimated
win-rate of y against π_t; η is the step size of the multiplicative-weights update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def off_diagonal_mean(values: torch.Tensor) -> torch.Tensor:
    """``[G, K, K] -> [G]``: the mean over the K(K − 1) ordered pairs i ≠ j of each group."""
    k = values.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=values.device)
    return values.masked_fill(eye, 0).sum((-2, -1)) / (k * (k - 1))


def inpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    initial_logps: torch.Tensor | None,
    preferences: torch.Tensor,
    eta: float,
    tau: float,
) -> torch.Tensor:
    """INPO (Zhang et al. 2024, arXiv 2407.00617) on a prompt's K responses, ``[G, K]`` each and the preference
    matrix ``[G, K, K]`` → ``[G]``, no reduction.

    INPO runs online mirror descent on the KL-regularised preference game, whose step is

        π_{t+1}(y|x) ∝ π_t(y|x)^{1−ητ} · π_ref(y|x)^{ητ} · exp( η · P(y ≻ π_t | x) ),

    and reaches it without estimating P(y ≻ π_t): with

        h(y, y') = log π_θ(y)/π_θ(y') − ητ · log π_ref(y)/π_ref(y') − (1 − ητ) · log π_t(y)/π_t(y'),

    the minimiser of E_{y, y' ~ π_t}[ ( h(y, y') − η · (I(y ≻ y') − ½) )² ] (I ~ Bernoulli(P(y ≻ y'))) is that step,
    because a regression onto functions of the form f(y) − f(y') recovers f(y) = η · E_{y'} P(y ≻ y') + const (the
    paper's key step; with a winner and a loser it reads ( h(y_w, y_l) − η/2 )², an IPO-style loss). Here the judge's
    probability P(y_i ≻ y_j) from the K × K matrix stands in for the sampled I (same minimiser, less variance), and
    the mean runs over every ordered pair i ≠ j of the group:

        ℓ = mean_{i≠j} ( h(y_i, y_j) − η · (P(y_i ≻ y_j) − ½) )².

    ``initial_logps`` is log π_ref, the starting policy (see ``LossParams.inpo_tau``); with τ = 0 it is unused (None
    is allowed) and the step is the plain multiplicative-weights step SPPO approximates, without SPPO's ½ standing in
    for log Z (it cancels in the pairwise differences).
    """
    mix = eta * tau
    g = policy_logps - ref_logps  # log π_θ − log π_t; the ref-mixing below adds ητ · (log π_t − log π_ref)
    if mix != 0:
        g = g + mix * (ref_logps - initial_logps)
    h = g[:, :, None] - g[:, None, :]  # (G, K, K): h(y_i, y_j)
    return off_diagonal_mean((h - eta * (preferences - 0.5)) ** 2)


def dno_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, win_rates: torch.Tensor, beta: float) -> torch.Tensor:
    """DNO (Rosset et al. 2024, arXiv 2404.03715, Algorithm 1) on a prompt's K responses, ``[G, K]`` each → ``[G]``,
    no reduction: with r(y) = P(y ≻ π_t | x), the win-rate against the policy that sampled them (the row means of the
    preference matrix), every pair (y_i, y_j) is a soft-labelled DPO term against π_t,

        ℓ_ij = −σ(r_i − r_j) · log σ(β·[ log π_θ/π_t(y_i) − log π_θ/π_t(y_j) ])
               −σ(r_j − r_i) · log σ(β·[ log π_θ/π_t(y_j) − log π_θ/π_t(y_i) ]),

    averaged over the K(K − 1)/2 pairs i < j. Its minimiser moves the policy by the regression
    log π_θ/π_t(y_i) − log π_θ/π_t(y_j) = (r_i − r_j)/β, DNO's step towards the Nash policy.
    """
    m = beta * (policy_logps - ref_logps)  # (G, K)
    delta = m[:, :, None] - m[:, None, :]  # (G, K, K): β·(log-ratio of i − log-ratio of j)
    label = torch.sigmoid(win_rates[:, :, None] - win_rates[:, None, :])  # σ(r_i − r_j)
    # over ordered pairs each unordered pair appears twice, once per direction: twice their mean is the pairs' mean
    return 2 * off_diagonal_mean(-label * F.logsigmoid(delta))


def loss_weights(row_weight: torch.Tensor, paired: bool, rows_per_term: int | None = None) -> torch.Tensor:
    """Which loss terms count in a step's mean, ``[B] -> [B]``, or ``[B/2]`` for a paired batch (rows in (winner,
    loser) pairs), ``[B/K]`` for a grouped one (``rows_per_term`` = K): a row's term when its ``row_weight`` is 1 (0
    for an empty response, as verl masks them, and for filler rows), a pair's or group's when all of its rows count."""
    n = rows_per_term or (2 if paired else 1)
    return row_weight.reshape(-1, n).prod(-1)  # (B/n, n) -> (B/n,)


# ------------------------------------------------------------------------------------------------ loss types
@dataclass(frozen=True)
class LossTerms:
    """What a loss type is computed from: one value per row, ``[B]``, or for a paired loss one per row of each
    (winner, loser) pair, ``[G, 2]``, winner first (``TrainBatch.pairs``)."""

    logps: torch.Tensor
    """log π_θ(y|x), summed over the response tokens."""
    ref_logps: torch.Tensor
    """log π_t(y|x)."""
    targets: torch.Tensor
    """The batch's targets (what the entry's ``target`` computed in the pipeline; 0 without one)."""
    n_tokens: torch.Tensor
    """Response tokens of each row (at least 1)."""
    win_rates: torch.Tensor | None = None
    """P̂(y ≻ π_t | x) of each row."""
    preferences: torch.Tensor | None = None
    """For a grouped loss: ``[G, K, K]`` P(y_i ≻ y_j | x) within each group."""
    initial_logps: torch.Tensor | None = None
    """log π_ref(y|x) of the starting policy, when the loss type asks for it (``LossSpec.needs_initial``)."""


@dataclass(frozen=True)
class LossParams:
    """The loss types' own settings, each filled from the ``SPPOModule`` argument of the same name (``model.dpo_beta``,
    ``model.ipo_tau``); η is in the targets already."""

    dpo_beta: float = 0.1
    ipo_tau: float = 0.1
    eta: float = 1.0
    """η, for the losses that regress on the preference matrix rather than on the targets (``inpo``)."""
    inpo_tau: float = 0.1
    """τ of INPO's KL regularisation towards the starting policy (the log π_ref weight is ητ)."""


Target = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor | None], torch.Tensor]
"""``(rewards [P, K], win_rates [P, K], eta, pool) -> targets [P, K]``; ``pool`` is every rank's rewards."""


def win_rate_targets(rewards: torch.Tensor, win_rates: torch.Tensor, eta: float, pool=None) -> torch.Tensor:
    """η(P̂ − ½), eq. 3.6's target."""
    return eta * (win_rates - 0.5)


def reward_softmean_targets(rewards: torch.Tensor, win_rates: torch.Tensor, eta: float, pool=None) -> torch.Tensor:
    """η(r − SoftMean_η(r)) over the whole rollout batch (``softmean_targets``), the seed recipe's."""
    return softmean_targets(rewards, eta, pool=pool)


@dataclass(frozen=True)
class LossSpec:
    """Everything about one loss type: what it needs from the rollout, how its batch is laid out, how it is computed.
    The data side (``data/examples.py``, the datamodule's checks) and the module read the same entry."""

    compute: Callable[[LossTerms, LossParams], torch.Tensor]
    """Per-term losses, no reduction: ``[B]``, or ``[G]`` for a paired loss (its terms arrive as ``[G, 2]``)."""
    paired: bool
    """Rows are each prompt's winner and loser (in that order), rather than all K responses."""
    target: Target | None
    """What the pipeline puts in the batch's ``targets``; None: the loss has no target (0 in the batch)."""
    min_samples: int = 1
    """The fewest samples per prompt (``data.samples_per_prompt``) it needs ..."""
    min_samples_why: str = ""
    """... and why."""
    skips_ties: bool = False
    """Prompts whose K responses all tie are left out (no preference to learn from)."""
    clip: bool = False
    """``model.clip_ratio`` (the per-token trust region on a regression onto the targets) applies."""
    grouped: bool = False
    """One term per prompt from all its K responses: they arrive as ``[G, K]`` (``TrainBatch.groups``)."""
    needs_preferences: bool = False
    """It regresses on the K × K preference matrix (``Scores.preferences``), which the oracle must give."""
    needs_initial: Callable[[LossParams], bool] | None = None
    """Whether, with these settings, it needs log π_ref of the starting policy (``LossTerms.initial_logps``)."""


def _sppo(x: LossTerms, p: LossParams) -> torch.Tensor:
    return sppo_target_loss(x.logps, x.ref_logps, x.targets)  # (B,)


def _sppo_pair(x: LossTerms, p: LossParams) -> torch.Tensor:
    squared = sppo_target_loss(x.logps, x.ref_logps, x.targets)  # (G, 2)
    return (squared[:, 0] + squared[:, 1]) / 2  # as sppo_pair_loss: the mean of the winner's and the loser's


def _dpo(x: LossTerms, p: LossParams) -> torch.Tensor:
    return dpo_loss(x.logps[:, 0], x.logps[:, 1], x.ref_logps[:, 0], x.ref_logps[:, 1], p.dpo_beta)


def _ipo(x: LossTerms, p: LossParams) -> torch.Tensor:
    avg, avg_ref = x.logps / x.n_tokens, x.ref_logps / x.n_tokens  # per-token averages, as TRL's IPO (ipo_loss)
    return ipo_loss(avg[:, 0], avg[:, 1], avg_ref[:, 0], avg_ref[:, 1], p.ipo_tau)


def _inpo(x: LossTerms, p: LossParams) -> torch.Tensor:
    return inpo_loss(x.logps, x.ref_logps, x.initial_logps, x.preferences, p.eta, p.inpo_tau)  # (G,)


def _dno(x: LossTerms, p: LossParams) -> torch.Tensor:
    return dno_loss(x.logps, x.ref_logps, x.win_rates, p.dpo_beta)  # (G,)


_WIN_RATES_WITHIN = "it estimates win-rates within a prompt's samples; use sppo_softmean for 1"
_PAIRS_WITHIN = "it compares the responses of a prompt with each other"
_WINNER_AND_LOSER = "a winner and a loser"

LOSSES: dict[str, LossSpec] = {
    # the paper: all K samples, eq. 3.6
    "sppo": LossSpec(
        _sppo, paired=False, target=win_rate_targets, min_samples=2, min_samples_why=_WIN_RATES_WITHIN, clip=True
    ),
    # the authors' code: the winner and the loser, each regressed onto its own η(P̂ − ½); an all-tie prompt stays
    "sppo_pair": LossSpec(
        _sppo_pair, paired=True, target=win_rate_targets, min_samples=2, min_samples_why=_WINNER_AND_LOSER, clip=True
    ),
    # the verl seed recipe: η(r − SoftMean_η(r)), works with one sample per prompt
    "sppo_softmean": LossSpec(_sppo, paired=False, target=reward_softmean_targets, clip=True),
    # iterative DPO and IPO with π_t as reference: the SPPO paper's baselines
    "dpo": LossSpec(_dpo, paired=True, target=None, min_samples=2, min_samples_why=_WINNER_AND_LOSER, skips_ties=True),
    "ipo": LossSpec(_ipo, paired=True, target=None, min_samples=2, min_samples_why=_WINNER_AND_LOSER, skips_ties=True),
    # Nash learning on the same K x K matrix: INPO's pairwise regression, with its mixing towards the starting policy
    "inpo": LossSpec(
        _inpo,
        paired=False,
        target=None,
        min_samples=2,
        min_samples_why=_PAIRS_WITHIN,
        grouped=True,
        needs_preferences=True,
        needs_initial=lambda p: p.eta * p.inpo_tau != 0,
    ),  # fmt: skip
    # DNO: every pair of the K, a DPO term against π_t with the soft label σ(r_i − r_j) of their win-rates
    "dno": LossSpec(_dno, paired=False, target=None, min_samples=2, min_samples_why=_PAIRS_WITHIN, grouped=True),
}
"""Every ``model.loss_type``: adding a loss type is adding an entry here."""

LOSS_TYPES = tuple(LOSSES)
"""Every ``model.loss_type`` (the names of ``LOSSES``)."""
PAIR_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.paired)
"""The loss types that train on a winner and a loser per prompt."""
