"""A reward function given by import path that misbehaves on some responses: each such response scores 0 (a loss),
is counted and reported; past a share that is a setting the run stops with one message naming the function."""

import pytest

from sppo_lightning.errors import DataError
from sppo_lightning.rewards.base import RuleOracle
from tests.rewards.test_oracles import rollout_of


def moody(response: str, ground_truth: str) -> float:
    """1 for "good", and every way a user's function goes wrong for the others."""
    if response == "boom":
        raise ValueError("cannot parse")
    return {"good": 1.0, "nan": float("nan"), "big": 1.5, "neg": -0.5}.get(response, 0.0)


def test_unscorable_responses_score_zero_are_counted_and_reported():
    rollout = rollout_of([["good", "boom", "bad", "good"], ["nan", "good", "big", "neg"]])
    oracle = RuleOracle(moody, max_unscored_share=0.5)
    with pytest.warns(UserWarning, match=r"moody\): 4 of 8 responses could not be scored and score 0 \(first: "
                      r"prompt 0, response 1: raised ValueError: cannot parse\)"):  # fmt: skip
        scores = oracle.score(rollout)
    assert scores.rewards.tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    assert scores.unscored == 4
    assert scores.win_rates[0].tolist() == [0.75, 0.25, 0.25, 0.75]  # the failures lose like wrong answers


def test_past_the_threshold_the_run_stops_with_one_message():
    rollout = rollout_of([["good", "boom", "nan", "big"]])
    with pytest.raises(DataError, match=r"3 of 4 responses could not be scored, more than "
                       r"data.oracle.init_args.max_unscored_share=0.1 \(first: prompt 0, response 1"):  # fmt: skip
        RuleOracle(moody).score(rollout)
