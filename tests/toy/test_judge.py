"""The toy pairwise judge of benchmarks/preference.py: graded closeness, and the style cycle that makes it
intransitive, against values computed by hand."""

import math

import pytest
import torch

from sppo_lightning.toy.judge import ClosenessJudge, cycle_sign, parse_answer, parse_truth
from tests.rewards.test_oracles import rollout_of

Q = "What is 93+78?"  # 171, residue 0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_parsing():
    assert parse_truth(Q) == 171 and parse_truth("no sum here") is None
    assert parse_answer("\\boxed{170}") == 170
    assert parse_answer("I think 3, no: \\boxed{12} or 13") == 12  # the boxed answer wins over later numbers
    assert parse_answer("maybe 7 or 9") == 9 and parse_answer("no idea") is None


def test_graded_judge_by_hand():
    judge = ClosenessJudge(scale=2.0)
    # distances 1 and 5: σ((5 - 1) / 2) = σ(2)
    assert judge.probability(Q, "\\boxed{170}", "\\boxed{176}") == pytest.approx(sigmoid(2.0))
    assert judge.probability(Q, "\\boxed{176}", "\\boxed{170}") == pytest.approx(sigmoid(-2.0))
    assert judge.probability(Q, "\\boxed{171}", "\\boxed{171}") == 0.5
    # no number: 100 away (the cap), σ((100 - 0) / 2) ≈ 1
    assert judge.probability(Q, "\\boxed{171}", "hm") == pytest.approx(sigmoid(50.0))


def test_cycle_of_residues():
    assert [cycle_sign(0, 1), cycle_sign(1, 2), cycle_sign(2, 0)] == [1, 1, 1]  # 0 ≻ 1 ≻ 2 ≻ 0
    assert [cycle_sign(1, 0), cycle_sign(3, 6), cycle_sign(None, 1)] == [-1, 0, 0]


def test_intransitive_judge_has_a_cycle_around_the_truth():
    judge = ClosenessJudge(scale=2.0, cycle=1.0)
    p = lambda a, b: judge.probability(Q, f"\\boxed{{{a}}}", f"\\boxed{{{b}}}")  # noqa: E731
    # 170 (residue 2) beats 171 (0): σ(-1/2 + 1); 171 beats 172 (1): σ(1/2 + 1); 172 beats 170: σ(0 + 1)
    assert p(170, 171) == pytest.approx(sigmoid(0.5))
    assert p(171, 172) == pytest.approx(sigmoid(1.5))
    assert p(172, 170) == pytest.approx(sigmoid(1.0))
    assert min(p(170, 171), p(171, 172), p(172, 170)) > 0.5  # a cycle: no best answer
    assert p(171, 167) == pytest.approx(sigmoid(4 / 2 - 1))  # 4 off loses to the truth despite its winning style


def test_judge_as_an_oracle_gives_win_rates_by_hand():
    rollout = rollout_of([["\\boxed{171}", "\\boxed{173}"]])
    rollout.prompts[0].messages[0]["content"] = Q
    scores = ClosenessJudge(scale=2.0).score(rollout)
    win = sigmoid(1.0)  # distance 0 against 2
    torch.testing.assert_close(scores.win_rates, torch.tensor([[(0.5 + win) / 2, (0.5 + 1 - win) / 2]]))


def test_length_bias_is_a_logit_per_character():
    # "\boxed{171}" (11 characters) against "so \boxed{171}" (14): equally close, the longer wins σ(3 · 0.25)
    judge = ClosenessJudge(scale=2.0, length_bias=0.25)
    q = "What is 93+78?"
    assert judge.probability(q, r"so \boxed{171}", r"\boxed{171}") == pytest.approx(1 / (1 + math.exp(-0.75)))
    # one off but 3 characters longer: σ(−1/2 + 3/4)
    assert judge.probability(q, r"so \boxed{170}", r"\boxed{171}") == pytest.approx(1 / (1 + math.exp(-0.25)))
