"""The Nash-learning loss types on the K x K preference matrix (``inpo``, ``dno``): their values by hand, and
through the real pipeline the matrix reaching the step, row for row."""

import math

import pytest
import torch

from sppo_lightning.loss import LOSSES, dno_loss, inpo_loss
from sppo_lightning.preference import pairwise_from_rewards, symmetrized
from sppo_lightning.records import Scores
from tests.test_loss_types import ETA, GROUPS, FixedRewards, fit


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_inpo_by_hand():
    # one prompt, K = 2: P(y1 ≻ y2) = 0.8. Log-probs: π_θ (−1, −3), π_t (−2, −2), π_ref (−1.5, −2.5); η = 2, τ = 0.25
    # so ητ = 0.5 and g = log π_θ − ½ log π_t − ½ log π_ref = (−1 + 1 + 0.75, −3 + 1 + 1.25) = (0.75, −0.75):
    # h(1, 2) = 1.5 against the target η(0.8 − ½) = 0.6, h(2, 1) = −1.5 against −0.6: ℓ = 0.9² = 0.81
    pref = torch.tensor([[[0.5, 0.8], [0.2, 0.5]]])
    got = inpo_loss(
        torch.tensor([[-1.0, -3.0]]), torch.tensor([[-2.0, -2.0]]), torch.tensor([[-1.5, -2.5]]), pref, 2.0, 0.25
    )
    assert got.tolist() == pytest.approx([0.81])
    # τ = 0: π_ref drops out (None is fine): g = (1, −1), h = 2, ℓ = (2 − 0.6)² = 1.96
    got = inpo_loss(torch.tensor([[-1.0, -3.0]]), torch.tensor([[-2.0, -2.0]]), None, pref, 2.0, 0.0)
    assert got.tolist() == pytest.approx([1.96])


def test_inpo_with_three_responses_is_the_mean_over_the_pairs():
    # K = 3 at π_θ = π_t = π_ref (g = 0): ℓ = η² · mean over the 6 ordered pairs of (P_ij − ½)²
    #   = 4 · 2 · (0.3² + 0.1² + 0.4²) / 6 = 4 · 0.52 / 6
    pref = symmetrized(torch.tensor([[[0.5, 0.8, 0.6], [0.2, 0.5, 0.1], [0.4, 0.9, 0.5]]]))
    zeros = torch.zeros(1, 3)
    assert inpo_loss(zeros, zeros, zeros, pref, 2.0, 0.1).tolist() == pytest.approx([4 * 0.52 / 6])
    # and it is minimal (0) where h(y_i, y_j) = η(P_ij − ½) holds for every pair it can: here P is itself a
    # difference of win-rates (Bradley-Terry-free but additive), g_i = η · (w_i − mean w) fits exactly
    w = torch.tensor([0.3, -0.1, 0.0])
    additive = 0.5 + (w[:, None] - w[None, :])
    g = 2.0 * w
    assert inpo_loss(g[None], zeros, zeros, additive[None], 2.0, 0.0).tolist() == pytest.approx([0.0], abs=1e-12)


def test_dno_by_hand():
    # K = 2, win-rates (0.75, 0.25), β = 0.5, log-ratios log π_θ/π_t = (1, −1): Δ = β·2 = 1, soft label σ(0.5)
    #   ℓ = −σ(0.5) log σ(1) − σ(−0.5) log σ(−1)
    got = dno_loss(torch.tensor([[0.0, -3.0]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[0.75, 0.25]]), 0.5)
    want = -sigmoid(0.5) * math.log(sigmoid(1)) - sigmoid(-0.5) * math.log(sigmoid(-1))
    assert got.tolist() == pytest.approx([want])
    # K = 3 at π_t: every pair is log 2 (σ(d) + σ(−d) = 1), whatever the win-rates
    assert dno_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0.9, 0.1, 0.5]]), 0.1).tolist() == (
        pytest.approx([math.log(2)])
    )


class FixedMatrix(FixedRewards):
    """The rewards' preference matrix, as the rule oracle returns it."""

    def score(self, rollout, device=None):
        scores = super().score(rollout, device)
        return Scores(scores.rewards, scores.win_rates, preferences=pairwise_from_rewards(scores.rewards))


@pytest.mark.parametrize("loss_type", ["inpo", "dno"])
def test_the_matrix_reaches_the_step_and_the_first_loss_is_known(loss_type, monkeypatch):
    """Through the real pipeline: a grouped batch holds each prompt's K rows with their rows of the matrix, and at
    π_t = π_ref (the first step) INPO's loss is η² · mean (P_ij − ½)², DNO's log 2."""
    import tests.test_loss_types as fixed

    monkeypatch.setattr(fixed, "FixedRewards", FixedMatrix)
    module, watch = fit(loss_type, micro_batch_size=12)
    [batch] = watch.batches
    assert batch.grouped and batch.rows_per_term == 4 and batch.preferences.shape == (12, 4)
    groups = batch.groups(batch.group)  # (3, 4): rows of one prompt together
    assert all(len(set(g.tolist())) == 1 for g in groups)
    for ids, prompt_len, prefs in zip(batch.groups(batch.input_ids), batch.groups(batch.prompt_lengths),
                                      batch.groups(batch.preferences), strict=True):  # fmt: skip
        prompt = tuple(ids[0, : prompt_len[0]].tolist())
        torch.testing.assert_close(prefs, pairwise_from_rewards(torch.tensor([GROUPS[prompt][1]]))[0])
    if loss_type == "inpo":
        p = batch.groups(batch.preferences)
        expected = float(((ETA * (p - 0.5)) ** 2).sum((-2, -1)).mean() / 12)  # 12 ordered pairs of 4
        assert module._initial  # π_ref was loaded (τ = 0.1, η = 2)
    else:
        expected = math.log(2)
    assert watch.losses[0] == pytest.approx(expected, rel=1e-4)
    assert expected > 0.1


def test_inpo_without_a_matrix_is_one_clear_error():
    from sppo_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="model.loss_type=inpo regresses on the oracle's K x K preference matrix"):
        fit("inpo", micro_batch_size=12)


def test_entries():
    assert LOSSES["inpo"].grouped and LOSSES["inpo"].needs_preferences and not LOSSES["inpo"].paired
    assert LOSSES["dno"].grouped and not LOSSES["dno"].needs_preferences
