"""Validation metrics: accuracy overall, by level and subject, mean@k and pass@k, and the win rate against the
starting policy's responses, computed by hand."""

import json
import math

import pytest
import torch

from sppo_lightning.data.prompts import PromptRecord
from sppo_lightning.evaluation import (
    GroupedAccuracy,
    ReferenceResponses,
    WinRate,
    group_keys,
    preference_over_reference,
    reference_key,
)
from sppo_lightning.rewards.base import RuleOracle
from sppo_lightning.rewards.pairwise import PairwiseOracle
from sppo_lightning.toy.task import difficulty


def rec(**extra) -> PromptRecord:
    return PromptRecord(messages=[{"role": "user", "content": "q"}], ground_truth="1", extra_info=extra)


@pytest.mark.parametrize(
    ("extra", "keys"),
    [
        ({"level": "Level 3", "subject": "Intermediate Algebra"}, ["level_3", "subject/intermediate_algebra"]),
        ({"level": 5, "type": "Number Theory"}, ["level_5", "subject/number_theory"]),  # MATH's raw field names
        ({"level": "Level ?"}, []),  # MATH has a few of these: counted overall only
        ({}, []),
    ],
)
def test_group_keys(extra, keys):
    assert group_keys(rec(**extra)) == keys


def test_greedy_accuracy_by_level_and_subject():
    records = [
        rec(level="Level 1", subject="Algebra"),
        rec(level="Level 1", subject="Geometry"),
        rec(level="Level 2", subject="Algebra"),
        rec(),
    ]
    metric = GroupedAccuracy([k for r in records for k in group_keys(r)])
    metric.update(torch.tensor([[1.0], [0.0]]), records[:2])  # two batches, as validation_step sees them
    metric.update(torch.tensor([[1.0], [1.0]]), records[2:])
    assert metric.compute() == {
        "accuracy": 0.75,
        "accuracy/level_1": 0.5,
        "accuracy/level_2": 1.0,
        "accuracy/subject/algebra": 1.0,
        "accuracy/subject/geometry": 0.0,
    }


def test_sampled_validation_reports_mean_at_k_and_pass_at_k():
    records = [rec(level=1), rec(level=1), rec(level=2)]
    metric = GroupedAccuracy(["level_1", "level_2"])
    metric.update(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]), records)
    got = metric.compute()
    assert got["accuracy"] == pytest.approx((0.25 + 0 + 0.75) / 3)  # mean@4
    assert got["pass@4"] == pytest.approx(2 / 3)  # any of the 4 correct
    assert got["accuracy/level_1"] == pytest.approx(0.125)


def test_no_prompts_gives_no_numbers():
    assert GroupedAccuracy([]).compute() == {}


@pytest.mark.parametrize(("a", "b", "level"), [(12, 34, 1), (15, 7, 2), (55, 55, 3), (99, 1, 3), (0, 0, 1)])
def test_toy_levels_count_carries(a, b, level):
    assert difficulty(a, b) == level


@pytest.mark.parametrize(("num_prompts", "world_size", "batch_size"), [(51, 2, 10), (5, 4, 1), (3, 4, 2), (8, 1, 3)])
def test_validation_shares_count_each_prompt_once_and_keep_ranks_in_step(num_prompts, world_size, batch_size):
    """Each rank's validation batches: together they score every prompt exactly once, and every rank generates for
    the same number of batches of the same sizes (a rank one prompt short pads with an unscored row)."""
    from types import SimpleNamespace

    from sppo_lightning.data.datamodule import RolloutDataModule

    dm = RolloutDataModule(train=None, val_batch_size=batch_size)
    dm.val_prompts = [rec(index=i) for i in range(num_prompts)]
    dm.val_prompt_ids = [[1, 10 + i] for i in range(num_prompts)]
    scored, shapes = [], set()
    for rank in range(world_size):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        batches = list(dm.val_dataloader())
        shapes.add(tuple(len(b.prompt_ids) for b in batches))
        for b in batches:
            assert [[1, 10 + r.extra_info["index"]] for r in b.records] == b.prompt_ids[: len(b.records)]
            scored += [r.extra_info["index"] for r in b.records]
    assert sorted(scored) == list(range(num_prompts))
    assert len(shapes) == 1


# ------------------------------------------------------------------------------------------------- win rate
class LongerIsBetter(PairwiseOracle):
    """A judge that prefers the longer text: P(a ≻ b) = σ((len(a) − len(b)) / 4), plus ``bias`` for the one shown
    first (which the symmetrised win-rate must cancel)."""

    def __init__(self, bias: float = 0.0, include_self: bool = True):
        super().__init__(include_self=include_self)
        self.bias = bias

    def prefer(self, prompts, first, second, device):
        diff = torch.tensor([len(a) - len(b) for a, b in zip(first, second, strict=True)], dtype=torch.float32)
        return (torch.sigmoid(diff / 4) + self.bias).clamp(0, 1)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("include_self", [True, False])
def test_preference_over_reference_by_hand(include_self):
    records = [rec(), PromptRecord([{"role": "user", "content": "other"}], "2")]
    responses = [["abcdef", "ab"], ["xyz", "xyz"]]
    reference = [["ab", "abcdef"], ["xyz", "uvw"]]
    got = preference_over_reference(LongerIsBetter(bias=0.1, include_self=include_self), records, responses, reference)
    # length differences +4, -4, 0, 0: σ(1), σ(-1), ½ and ½ (identical texts give exactly ½ whatever the bias)
    expected = torch.tensor([[sigmoid(1.0), sigmoid(-1.0)], [0.5, 0.5]])
    torch.testing.assert_close(got, expected)


def test_preference_over_reference_with_a_rule_oracle_counts_ties_half():
    records = [PromptRecord([{"role": "user", "content": "1+1?"}], "2")] * 3
    got = preference_over_reference(
        RuleOracle(lambda text, truth: float(text == truth)), records, [["2"], ["3"], ["2"]], [["3"], ["2"], ["2"]]
    )
    torch.testing.assert_close(got, torch.tensor([[1.0], [0.0], [0.5]]))


def test_win_rate_metric_means_over_pairs():
    metric = WinRate()
    metric.update(torch.tensor([[1.0, 0.5]]), torch.tensor([[4.0, 6.0]]), torch.tensor([[5.0, 5.0]]))
    metric.update(torch.tensor([[0.0, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    # length-controlled, by hand: the differences (−1, +1, +1, −1) are ±t after tanh(Δ / std Δ); the shorter ones
    # won 1 and ½, the longer ½ and 0, so θ − φt = logit ¾ and θ + φt = logit ¼: θ = 0, an even match at equal length
    assert metric.compute() == {
        "win_rate": 0.5, "win_rate_lc": pytest.approx(0.5), "response_length": 3.0, "reference_length": 3.0
    }  # fmt: skip
    assert WinRate().compute() == {}


def test_reference_file_round_trip_and_lookup(tmp_path):
    from sppo_lightning.errors import DataError

    ref = ReferenceResponses(tmp_path / "reference_responses.jsonl")
    ref.add([rec()], [[[5, 6, 7], [5]]], [["é 2", "2"]])
    ref.save()
    loaded = ReferenceResponses.load(tmp_path / "reference_responses.jsonl")
    assert loaded.entries == ref.entries == {reference_key(rec()): {"responses": ["é 2", "2"], "lengths": [3, 1]}}
    assert json.loads((tmp_path / "reference_responses.jsonl").read_text())["prompt"] == rec().messages
    texts, lengths = loaded.lookup([rec()], n=1)
    assert texts == [["é 2"]] and lengths.tolist() == [[3.0]]
    with pytest.raises(DataError, match="no 3 reference response"):
        loaded.lookup([rec()], n=3)


@pytest.mark.slow
def test_fit_logs_win_rate_against_the_starting_policy(tmp_path):
    """With a judge that prefers longer responses as the oracle, the first val/win_rate is the judge's verdict on
    identical pairs (½), the reference is written once, the policy learns to answer longer and wins, and a resumed
    run reuses the reference."""
    from tests.test_cli import DEMO, read_metrics, run

    small = [
        "--config", DEMO, "--data.prompts_per_epoch=16", "--data.val.init_args.num_prompts=40",
        "--data.val_batch_size=40", "--data.oracle=tests.test_evaluation.LongerIsBetter",
        "--trainer.enable_progress_bar=false", "--model.learning_rate=1e-3", "--model.eta=8",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    run("fit", *small, "--trainer.max_epochs=3")
    path = tmp_path / "reference_responses.jsonl"
    reference = ReferenceResponses.load(path).entries
    assert len(reference) <= 40 and all(len(r["responses"]) == 1 for r in reference.values())
    ref_length = sum(r["lengths"][0] for r in reference.values()) / len(reference)

    rows = [r for r in read_metrics(tmp_path) if r.get("val/win_rate")]
    win = [float(r["val/win_rate"]) for r in rows]
    assert len(win) == 4 and win[0] == 0.5  # before any update the policy is the reference
    assert float(rows[0]["val/response_length"]) == pytest.approx(ref_length)
    assert all(float(r["val/reference_length"]) == pytest.approx(ref_length) for r in rows)
    assert win[-1] > 0.6, win  # longer answers, preferred by the judge
    assert float(rows[-1]["val/response_length"]) > ref_length

    before = path.read_bytes()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    run("fit", *small, "--trainer.max_epochs=4", "--ckpt_path=last")
    assert path.read_bytes() == before  # the starting policy's responses, not the resumed policy's
    assert len([r for r in read_metrics(tmp_path) if r.get("val/win_rate")]) == 5


# ------------------------------------------------------------------------------------------------ Validation
class SpacedDigits:
    """A tokenizer stand-in: ids are digits, decoded with spaces ([1, 1, 1] -> "1 1 1")."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


def test_validation_scores_batches_and_judges_against_the_reference_of_its_first_pass(tmp_path):
    """Two passes over one batch of 2 prompts (plus a padding row), 2 samples each, by hand: the first collects the
    reference (win rate exactly ½) and writes it; the second is judged against it by a judge preferring longer texts,
    σ((len(a) − len(b)) / 4) symmetrised; the padding row is generated but never scored."""
    from sppo_lightning.evaluation import Validation
    from sppo_lightning.records import SamplingParams, ValBatch

    records = [
        PromptRecord([{"role": "user", "content": "a"}], "1", extra_info={"level": 1}),
        PromptRecord([{"role": "user", "content": "b"}], "1", extra_info={"level": 2}),
    ]
    batch = ValBatch([[10], [20], [10]], records, SamplingParams(n=2, temperature=0))
    passes = [
        {10: [[1], [2]], 20: [[1], [1]]},  # the starting policy: texts "1", "2" and "1", "1"
        {10: [[1, 1, 1], [2]], 20: [[1], [1]]},  # later: "1 1 1" beats the reference "1"; the rest repeat it
    ]
    seeds, policy = [], {}

    def generate(prompt_ids, params, seed):
        seeds.append(seed)
        return [policy[ids[0]] for ids in prompt_ids]

    validation = Validation(lambda text, truth: float(text == truth), SpacedDigits())
    results = []
    for i, responses in enumerate(passes):
        policy.update(responses)
        collect = tmp_path / "ref.jsonl" if i == 0 else None
        validation.start(records, LongerIsBetter(), "cpu", seed=7 + i, reference=collect)
        validation.score(batch, generate)
        results.append(validation.finish())
    assert seeds == [7, 8]
    first, second = results
    assert first == {
        "accuracy": 0.75, "pass@2": 1.0, "accuracy/level_1": 0.5, "accuracy/level_2": 1.0,  # (1 + 0)/2 and (1 + 1)/2
        "win_rate": 0.5, "win_rate_lc": 0.5, "response_length": 1.0, "reference_length": 1.0,
    }  # fmt: skip
    saved = ReferenceResponses.load(tmp_path / "ref.jsonl").entries
    assert saved == {
        reference_key(records[0]): {"responses": ["1", "2"], "lengths": [1, 1]},
        reference_key(records[1]): {"responses": ["1", "1"], "lengths": [1, 1]},
    }
    assert second["accuracy"] == 0.5 and second["accuracy/level_1"] == 0.0  # "1 1 1" and "2" are wrong
    assert second["win_rate"] == pytest.approx((sigmoid(4 / 4) + 3 * 0.5) / 4)  # "1 1 1" has 5 characters, "1" 1
    assert second["response_length"] == 1.5 and second["reference_length"] == 1.0  # (3 + 1 + 1 + 1) / 4 tokens
    # the one win is the one longer response (3 tokens against 1; the others tie at equal length): at equal length
    # the GLM's θ fits the ties, logit ½ = 0 (up to the ridge on the length slope)
    assert second["win_rate_lc"] == pytest.approx(0.5, abs=0.01)


class ShorterIsBetter(LongerIsBetter):
    def prefer(self, prompts, first, second, device):
        return 1 - super().prefer(prompts, first, second, device)


def test_a_validation_judge_judges_the_win_rate_and_the_training_oracle_is_logged_beside_it(tmp_path):
    """``model.val_judge`` decides ``win_rate``; the training oracle's verdict is ``win_rate_train_judge``: a policy
    that grew longer wins by the length-loving training judge and loses by the held-out judge that prefers brevity."""
    from sppo_lightning.evaluation import Validation, judges
    from sppo_lightning.records import SamplingParams, ValBatch

    records = [PromptRecord([{"role": "user", "content": "a"}], "1")]
    batch = ValBatch([[10]], records, SamplingParams(n=1, temperature=0))
    validation = Validation(lambda text, truth: 0.0, SpacedDigits(), judge=ShorterIsBetter())
    results = []
    for i, response in enumerate(([[1]], [[1, 1, 1]])):  # "1", then "1 1 1"
        validation.start(records, LongerIsBetter(), "cpu", seed=i, reference=tmp_path / "ref.jsonl" if i == 0 else None)
        validation.score(batch, lambda prompt_ids, params, seed, r=response: [r])
        results.append(validation.finish())
    assert results[0]["win_rate"] == results[0]["win_rate_train_judge"] == 0.5
    assert results[1]["win_rate"] == pytest.approx(sigmoid(-4 / 4))  # 5 characters against 1
    assert results[1]["win_rate_train_judge"] == pytest.approx(sigmoid(4 / 4))
    assert results[1]["win_rate_lc"] == pytest.approx(results[1]["win_rate"])  # one pair: nothing to control for
    assert set(results[1]) >= {"win_rate_lc_train_judge", "response_length", "reference_length"}
    assert "response_length_train_judge" not in results[1]
    oracle = LongerIsBetter()
    assert judges(None, oracle) == {"": oracle} and judges(None, None) == {}
    assert judges(oracle, oracle) == {"": oracle}  # the same judge twice is one


def test_validation_resumes_against_the_saved_reference_or_goes_without(tmp_path):
    from sppo_lightning.evaluation import Validation

    validation = Validation(lambda text, truth: 1.0, SpacedDigits())
    with pytest.warns(UserWarning, match="no .*missing.jsonl to resume the win rate against"):
        validation.load_reference(tmp_path / "missing.jsonl")
    assert validation.reference is None
    saved = ReferenceResponses(tmp_path / "ref.jsonl", {reference_key(rec()): {"responses": ["2"], "lengths": [1]}})
    saved.save()
    validation.load_reference(tmp_path / "ref.jsonl")
    assert validation.reference.entries == saved.entries


@pytest.mark.parametrize(
    ("setting", "oracle", "enabled"),
    [(None, RuleOracle(), False), (None, LongerIsBetter(), True), (None, None, False), (False, LongerIsBetter(), False),
     (True, RuleOracle(), True)],
)  # fmt: skip
def test_win_rate_is_on_for_preference_oracles_unless_set(setting, oracle, enabled):
    from sppo_lightning.evaluation import win_rate_enabled

    assert win_rate_enabled(setting, oracle) is enabled
    assert win_rate_enabled(setting, oracle, judge=LongerIsBetter()) is (setting is not False)  # a judge: on


def test_a_forced_win_rate_without_an_oracle_is_refused():
    from sppo_lightning.errors import ConfigError
    from sppo_lightning.evaluation import win_rate_enabled

    with pytest.raises(ConfigError, match="model.val_win_rate needs a judge: model.val_judge, or the datamodule's"):
        win_rate_enabled(True, None)


@pytest.mark.slow
def test_the_reference_merges_every_ranks_share_under_fsdp(tmp_path):
    """On 2 processes each rank generates the reference for its half of the 41 validation prompts (21 + 20, one
    padding row): the file holds every prompt once, and the first win rate is still exactly ½."""
    from sppo_lightning.toy import AdditionPrompts
    from tests.test_cli import DEMO, REPO, read_metrics, run

    run(
        "fit", "--config", DEMO, "--config", str(REPO / "configs" / "fsdp_cpu.yaml"), "--trainer.max_epochs=1",
        "--data.prompts_per_epoch=16", "--data.val.init_args.num_prompts=41", "--data.val_batch_size=41",
        "--data.oracle=tests.test_evaluation.LongerIsBetter", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", ranks=2,
    )  # fmt: skip
    reference = ReferenceResponses.load(tmp_path / "reference_responses.jsonl").entries
    val = AdditionPrompts("val", num_prompts=41, seed=1).load()  # the demo's validation prompts, 41 of them
    assert sorted(reference) == sorted({reference_key(r) for r in val}) and len(reference) == 41
    win = [float(r["val/win_rate"]) for r in read_metrics(tmp_path) if r.get("val/win_rate")]
    assert len(win) == 2 and win[0] == 0.5


@pytest.mark.slow
def test_a_fit_with_a_held_out_judge_logs_both_win_rates_and_the_lc_one_every_iteration(tmp_path):
    """``train.py fit`` with INPO on a length-biased pairwise judge and the unbiased one as ``model.val_judge``: every
    validation (the one before training included) logs ``val/win_rate``, ``val/win_rate_lc`` and
    ``val/win_rate_train_judge``, all ½ before any update."""
    from tests.test_cli import DEMO, read_metrics, run

    run(
        "fit", "--config", DEMO, "--trainer.max_epochs=2", "--data.prompts_per_epoch=8",
        "--data.val.init_args.num_prompts=16", "--data.val_batch_size=16", "--model.loss_type=inpo",
        "--data.oracle=sppo_lightning.toy.judge.ClosenessJudge", "--data.oracle.init_args.length_bias=0.25",
        "--model.val_judge=sppo_lightning.toy.judge.ClosenessJudge", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}",
    )  # fmt: skip
    keys = ("val/win_rate", "val/win_rate_lc", "val/win_rate_train_judge", "val/response_length")
    rows = [r for r in read_metrics(tmp_path) if r.get("val/win_rate")]
    assert len(rows) == 3 and all(r.get(k) for r in rows for k in keys)
    assert all(float(rows[0][k]) == 0.5 for k in keys[:3])
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in keys[:3])
