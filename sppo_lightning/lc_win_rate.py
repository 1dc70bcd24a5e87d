"""The length-controlled win rate of AlpacaEval 2 (Dubois et al. 2024, arXiv 2404.04475, §3), torch only.

A judge that prefers longer answers rewards a policy for growing longer, whatever else it learns. AlpacaEval 2
answers with a generalised linear model of the judge's preference that has the length difference as a mediator,
and reads the model's win rate off it at zero length difference ("what would the preference be if both outputs had
the same length?"). Their GLM (alpaca_eval ``metrics/glm_winrate.py``, ``length_controlled_v1``) is

    logit P(m ≻ b | x) = θ_m − θ_b  +  φ_{m,b} · tanh( (len_m − len_b) / std(len_m − len_b) )  +  (ψ_m − ψ_b) γ_x

and the length-controlled win rate is  LC = mean_x σ( θ_m − θ_b + (ψ_m − ψ_b) γ_x ),  the length term set to 0.
γ_x, the instruction's difficulty, is fitted once over AlpacaEval's leaderboard of models; here there is one model
and one baseline (the starting policy), so ψ drops out (their ``length_controlled_minimal`` formula) and

    logit p_i = θ + φ · tanh(Δ_i / s),   Δ_i = len(response_i) − len(reference_i),  s = std(Δ) (n − 1 divisor),
    LC = σ(θ).

θ and φ are fitted by maximum likelihood on the judge's soft preferences p_i ∈ [0, 1] (cross-entropy against the
probabilities, as their ``fit_LogisticRegressionCV(is_ytrue_proba=True)``), with a small ridge on φ only where they
use a cross-validated L1 penalty (a ridge has no cross-validation to run and a closed-form Newton step).
"""

from __future__ import annotations

import torch


def length_feature(length_diff: torch.Tensor) -> torch.Tensor:
    """tanh(Δ / std(Δ)), AlpacaEval 2's length term; all zeros when every Δ is the same (nothing to control for)."""
    d = length_diff.double()
    if d.numel() < 2:
        return torch.zeros_like(d)
    s = d.std()  # pandas' .std(), n − 1 divisor, as alpaca_eval
    if not torch.isfinite(s) or s == 0:
        return torch.zeros_like(d)
    return torch.tanh(d / s)


def fit_length_glm(
    preference: torch.Tensor, length_diff: torch.Tensor, ridge: float = 1e-3, iterations: int = 100
) -> tuple[float, float]:
    """(θ, φ) of logit p = θ + φ · tanh(Δ / std Δ), maximum likelihood on soft labels ``preference`` ``[N]``
    with a ridge ``ridge · φ² / 2`` (per sample) on φ; Newton's method with step halving, in float64."""
    p = preference.double().flatten().clamp(0, 1)
    x = length_feature(length_diff.flatten())
    features = torch.stack([torch.ones_like(x), x], dim=1)  # (N, 2): intercept θ, length slope φ
    penalty = torch.tensor([0.0, ridge], dtype=torch.float64)
    w = torch.zeros(2, dtype=torch.float64)

    def objective(w: torch.Tensor) -> torch.Tensor:  # mean cross-entropy against the soft labels + ridge
        z = features @ w
        return (torch.nn.functional.softplus(z) - p * z).mean() + 0.5 * (penalty * w * w).sum()

    current = objective(w)
    for _ in range(iterations):
        q = torch.sigmoid(features @ w)
        grad = features.T @ (q - p) / len(p) + penalty * w
        hess = (features.T * (q * (1 - q))) @ features / len(p) + torch.diag(penalty)
        hess = hess + 1e-12 * torch.eye(2, dtype=torch.float64)  # x ≡ 0 with ridge 0: φ is free, keep it at 0
        step = torch.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            candidate = w - scale * step
            value = objective(candidate)
            if value <= current:
                break
            scale /= 2
        else:
            break
        w, improvement, current = candidate, float(current - value), value
        if improvement < 1e-14 and float(grad.abs().max()) < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(preference: torch.Tensor, length_diff: torch.Tensor, ridge: float = 1e-3) -> float:
    """AlpacaEval 2's length-controlled win rate, σ(θ) of ``fit_length_glm`` (module doc), in [0, 1].

    ``preference[i]``: the judge's probability that the policy's i-th response beats the reference's;
    ``length_diff[i]``: their length difference (policy minus reference, in tokens or characters: the feature is
    standardised). Degenerate cases: every length difference equal (e.g. all the same length), or a single pair,
    leaves nothing to control for: the raw win rate (mean preference) is returned; all wins (losses) give 1 (0),
    where the GLM's θ would run off to ±∞. No pair: NaN.
    """
    p = preference.double().flatten()
    if p.numel() == 0:
        return float("nan")
    if bool((p >= 1).all()) or bool((p <= 0).all()):
        return float(p.mean().clamp(0, 1))
    if not bool(length_feature(length_diff).any()):
        return float(p.mean())
    theta, _ = fit_length_glm(p, length_diff, ridge)
    return float(torch.sigmoid(torch.tensor(theta)))
