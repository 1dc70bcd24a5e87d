"""A reward function given by import path that misbehaves on some responses: each such response scores 0 (a loss),
is counted and reported; past a share that is a setting the run stops with one message naming the function."""

import json

import pytest

from sppo_lightning.errors import DataError
from sppo_lightning.rewards.base import RuleOracle
from sppo_lightning.rewards.math import compute_score
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


def odd_length_raises(response: str, ground_truth: str) -> float:
    """The boxed-answer checker, except that it raises on a response of odd length."""
    if len(response) % 2:
        raise ValueError("odd")
    return compute_score(response, ground_truth)


@pytest.mark.slow
def test_a_fit_logs_each_rollouts_unscored_count(tmp_path):
    """Two iterations of the demo with a rule that cannot score some responses: each iteration's rollout/unscored
    is the number of its responses (all of them recorded in samples.jsonl) that the rule raised on, and they score 0."""
    from tests.test_cli import DEMO, read_metrics, run

    proc = run(
        "fit", "--config", DEMO, "--trainer.max_epochs=2", "--data.prompts_per_epoch=8",
        "--data.val.init_args.num_prompts=8", "--data.val_batch_size=8", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--data.oracle=sppo_lightning.rewards.RuleOracle",
        "--data.oracle.init_args.score_fn=tests.rewards.test_rule_faults.odd_length_raises",
        "--data.oracle.init_args.max_unscored_share=1.0",
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16  # every prompt of both rollouts (RolloutSamples records 8 per iteration)
    expected = [sum(len(x["text"]) % 2 for r in rows if r["epoch"] == e for x in r["responses"]) for e in (0, 1)]
    assert sum(expected) > 0  # the rule did raise
    assert all(x["reward"] == 0.0 for r in rows for x in r["responses"] if len(x["text"]) % 2)
    metrics = read_metrics(tmp_path)
    logged = {int(r["epoch"]): float(r["rollout/unscored"]) for r in metrics if r.get("rollout/unscored")}
    assert logged == {0: expected[0], 1: expected[1]}
    assert "responses could not be scored and score 0" in proc.stderr
