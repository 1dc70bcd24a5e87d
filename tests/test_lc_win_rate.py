"""AlpacaEval 2's length-controlled win rate against hand computations, and its degenerate cases."""

import math

import pytest
import torch

from sppo_lightning.lc_win_rate import fit_length_glm, length_controlled_win_rate, length_feature


def test_length_feature_is_tanh_of_the_standardised_difference():
    # Δ = (+2, +2, −2, −2): mean 0, std (n − 1) = sqrt(16/3) = 4/√3, so Δ/std = ±√3/2
    got = length_feature(torch.tensor([2.0, 2.0, -2.0, -2.0]))
    t = math.tanh(math.sqrt(3) / 2)
    assert got.tolist() == pytest.approx([t, t, -t, -t])


def test_two_lengths_fit_exactly_by_hand():
    # Two distinct length features, two parameters: the GLM fits both groups' preferences exactly,
    #   θ + φt = logit 0.8 = ln 4,   θ − φt = logit 0.4 = ln(2/3)   =>   θ = ln(8/3) / 2,
    # with t = tanh(a / std Δ) for Δ = ±a (tanh is odd, so the two features are ±t); so LC = σ(θ) =
    # √(8/3) / (1 + √(8/3)) = 0.6202, whatever t (and however many pairs each group has).
    expected = math.sqrt(8 / 3) / (1 + math.sqrt(8 / 3))
    for n_long, n_short in ((2, 2), (3, 1), (5, 2)):
        pref = torch.tensor([0.8] * n_long + [0.4] * n_short)
        diff = torch.tensor([30.0] * n_long + [-30.0] * n_short)
        assert length_controlled_win_rate(pref, diff, ridge=0.0) == pytest.approx(expected, abs=1e-6)
    # the raw win rate of the (2, 2) case is 0.6; the default ridge moves LC by less than 0.01
    assert length_controlled_win_rate(torch.tensor([0.8, 0.8, 0.4, 0.4]), torch.tensor([3.0, 3, -3, -3])) == (
        pytest.approx(expected, abs=0.01)
    )


def test_length_bias_is_removed():
    # The judge's preference is all length: longer wins 90 %, shorter 10 %, and the policy is longer on 3 of 4
    # prompts (raw win rate 70 %). At equal length it would be σ((logit 0.9 + logit 0.1) / 2) = 50 %.
    pref = torch.tensor([0.9, 0.9, 0.9, 0.1])
    diff = torch.tensor([12.0, 12.0, 12.0, -12.0])
    assert float(pref.mean()) == pytest.approx(0.7)
    assert length_controlled_win_rate(pref, diff, ridge=0.0) == pytest.approx(0.5, abs=1e-6)


def test_same_length_everywhere_is_the_raw_win_rate():
    pref = torch.tensor([0.9, 0.2, 0.6, 0.7])
    assert length_controlled_win_rate(pref, torch.zeros(4)) == pytest.approx(0.6)
    assert length_controlled_win_rate(pref, torch.full((4,), 5.0)) == pytest.approx(0.6)  # constant difference
    theta, phi = fit_length_glm(pref, torch.zeros(4))
    assert (theta, phi) == (pytest.approx(math.log(0.6 / 0.4)), 0.0)  # the intercept is logit of the mean


def test_all_wins_all_losses_and_no_pairs():
    assert length_controlled_win_rate(torch.ones(5), torch.tensor([1.0, 2, 3, 4, 5])) == 1.0
    assert length_controlled_win_rate(torch.zeros(5), torch.tensor([1.0, 2, 3, 4, 5])) == 0.0
    assert length_controlled_win_rate(torch.tensor([0.7]), torch.tensor([3.0])) == pytest.approx(0.7)
    assert math.isnan(length_controlled_win_rate(torch.zeros(0), torch.zeros(0)))


def test_perfectly_separated_by_length_stays_finite():
    # longer always wins, shorter always loses: the unpenalised slope φ would run to infinity; the ridge keeps the
    # fit finite and, the lengths being symmetric, the win rate at equal length is ½
    pref = torch.tensor([1.0, 1.0, 0.0, 0.0])
    got = length_controlled_win_rate(pref, torch.tensor([4.0, 4.0, -4.0, -4.0]))
    assert got == pytest.approx(0.5, abs=1e-6)
