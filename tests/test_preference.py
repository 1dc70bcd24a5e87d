"""Win-rates against hand computations, including an intransitive cycle."""

import math

import torch

from sppo_lightning.preference import win_rates_from_pairwise, win_rates_from_rewards, win_rates_from_scores


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_rewards_with_ties_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # response 0: vs self 1/2, beats 1 and 2, ties 3 -> (0.5 + 1 + 1 + 0.5) / 4
    # response 1: loses to 0 and 3, ties self and 2 -> (0 + 0.5 + 0.5 + 0) / 4
    expected = torch.tensor([[3 / 4, 1 / 4, 1 / 4, 3 / 4]])
    torch.testing.assert_close(win_rates_from_rewards(rewards), expected)
    # without self: over the 3 others
    torch.testing.assert_close(
        win_rates_from_rewards(rewards, include_self=False), torch.tensor([[5 / 6, 1 / 6, 1 / 6, 5 / 6]])
    )


def test_all_ties_give_one_half():
    torch.testing.assert_close(win_rates_from_rewards(torch.zeros(2, 3)), torch.full((2, 3), 0.5))


def test_scores_bradley_terry_by_hand():
    scores = torch.tensor([[2.0, 0.0, -1.0]])
    expected = [
        (0.5 + sig(2) + sig(3)) / 3,
        (sig(-2) + 0.5 + sig(1)) / 3,
        (sig(-3) + sig(-1) + 0.5) / 3,
    ]
    torch.testing.assert_close(win_rates_from_scores(scores), torch.tensor([expected]))


def test_win_rates_average_to_one_half():
    # Every pair's probabilities sum to 1, so a group's mean win-rate is exactly 1/2.
    torch.testing.assert_close(win_rates_from_scores(torch.randn(4, 5)).mean(dim=1), torch.full((4,), 0.5))


def test_pairwise_is_symmetrised_against_position_bias():
    # An oracle that says 0.9 for (0 vs 1) and 0.3 for (1 vs 0): the symmetrised P(0 > 1) is (0.9 + 0.7) / 2.
    probs = torch.tensor([[[0.5, 0.9], [0.3, 0.5]]])
    p01 = (0.9 + 1 - 0.3) / 2
    torch.testing.assert_close(win_rates_from_pairwise(probs), torch.tensor([[(0.5 + p01) / 2, (0.5 + 1 - p01) / 2]]))


def test_intransitive_cycle_gives_equal_win_rates():
    # a > b > c > a, each with probability 0.8: no response dominates, all win-rates equal 1/2.
    p = 0.8
    probs = torch.tensor([[[0.5, p, 1 - p], [1 - p, 0.5, p], [p, 1 - p, 0.5]]])
    torch.testing.assert_close(win_rates_from_pairwise(probs), torch.full((1, 3), 0.5))


def test_three_response_group_by_hand():
    # P(a>b) = 0.7, P(a>c) = 0.6, P(b>c) = 0.2
    probs = torch.tensor([[[0.5, 0.7, 0.6], [0.3, 0.5, 0.2], [0.4, 0.8, 0.5]]])
    expected = torch.tensor([[(0.5 + 0.7 + 0.6) / 3, (0.3 + 0.5 + 0.2) / 3, (0.4 + 0.8 + 0.5) / 3]])
    torch.testing.assert_close(win_rates_from_pairwise(probs), expected)


def test_binary_rewards_give_the_group_mean_baseline_advantage():
    """With 0/1 rewards, P̂ − ½ = (r − mean of the group) / 2: SPPO's target η(P̂ − ½) is the mean-baseline advantage
    (GRPO's, without its division by the group's standard deviation), scaled by η/2. Checked on every group of 4."""
    groups = torch.tensor([[(m >> b) & 1 for b in range(4)] for m in range(16)], dtype=torch.float32)
    torch.testing.assert_close(win_rates_from_rewards(groups) - 0.5, (groups - groups.mean(1, keepdim=True)) / 2)


def test_the_preference_matrices_are_the_win_rates_rows():
    from sppo_lightning.preference import pairwise_from_rewards, pairwise_from_scores, win_rates_from_pairwise
    from sppo_lightning.records import PromptRecord, Rollout
    from sppo_lightning.rewards.base import RuleOracle

    rewards = torch.tensor([[1.0, 0.0, 1.0]])
    torch.testing.assert_close(
        pairwise_from_rewards(rewards), torch.tensor([[[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]])
    )
    scores = torch.tensor([[0.0, math.log(3)]])  # σ(log 3) = 3/4
    torch.testing.assert_close(pairwise_from_scores(scores), torch.tensor([[[0.5, 0.25], [0.75, 0.5]]]))
    # the rule oracle returns the matrix its win-rates are the row means of
    rollout = Rollout([PromptRecord([{"role": "user", "content": "q"}], "2")], [[]], [[[], [], []]], [["2", "3", "2"]])
    got = RuleOracle(lambda text, truth: float(text == truth)).score(rollout)
    torch.testing.assert_close(got.preferences, pairwise_from_rewards(rewards))
    torch.testing.assert_close(got.win_rates, win_rates_from_pairwise(got.preferences))
