"""Oracles end in win-rates: a hand-built 3-response group for every estimator, intransitive preferences, and
tiny reward / pairwise models built from a config (random weights: plumbing and batching, not judgement)."""

import math

import pytest
import torch

from sppo_lightning.data.examples import build_groups
from sppo_lightning.data.prompts import PromptRecord
from sppo_lightning.rewards.pairwise import PairClassifierOracle, PairwiseOracle
from sppo_lightning.rewards.reward_model import RewardModelOracle
from sppo_lightning.rollout.base import Rollout


def rollout_of(responses: list[list[str]]) -> Rollout:
    return Rollout(
        prompts=[PromptRecord([{"role": "user", "content": f"question {p}"}], "1") for p in range(len(responses))],
        prompt_ids=[[1, 2] for _ in responses],
        response_ids=[[[10 + k] for k in range(len(g))] for g in responses],
        response_text=responses,
    )


class TableJudge(PairwiseOracle):
    """A judge from a table of true preferences, with a position bias: it adds ``bias`` to whichever response it
    is shown first. Records how many pairs each call carried."""

    def __init__(self, table: dict[tuple[str, str], float], bias: float = 0.0, batch_size: int = 64):
        super().__init__(batch_size=batch_size)
        self.table, self.bias, self.calls = table, bias, []

    def true(self, a, b):
        return self.table[(a, b)] if (a, b) in self.table else 1 - self.table[(b, a)]

    def prefer(self, prompts, first, second, device):
        self.calls.append(len(first))
        return torch.tensor([min(1.0, self.true(a, b) + self.bias) for a, b in zip(first, second, strict=True)])


# P(a ≻ b) = 0.8, P(a ≻ c) = 0.6, P(b ≻ c) = 0.3. With each response against itself (½):
#   P̂(a) = (0.5 + 0.8 + 0.6) / 3 = 0.6333, P̂(b) = (0.2 + 0.5 + 0.3) / 3 = 0.3333,
#   P̂(c) = (0.4 + 0.7 + 0.5) / 3 = 0.5333
TABLE = {("a", "b"): 0.8, ("a", "c"): 0.6, ("b", "c"): 0.3}
WIN = [1.9 / 3, 1.0 / 3, 1.6 / 3]
ETA = 2.0


def scored(bias=0.0, batch_size=64):
    rollout = rollout_of([["a", "b", "c"]])
    judge = TableJudge(TABLE, bias=bias, batch_size=batch_size)
    return rollout.with_scores(judge.score(rollout)), judge


def test_win_rates_by_hand_and_position_bias_cancels():
    rollout, judge = scored(bias=0.1)  # the judge favours the first-shown response by 0.1
    torch.testing.assert_close(rollout.win_rates, torch.tensor([WIN]))
    assert judge.calls == [6]  # both orders of the 3 pairs, in one call
    assert scored(batch_size=4)[1].calls == [4, 2]


def test_sppo_targets_by_hand():
    rollout, _ = scored()
    [group] = build_groups(rollout, "sppo", ETA)
    assert [e.target for e in group] == pytest.approx([ETA * (w - 0.5) for w in WIN])  # 0.2667, -0.3333, 0.0667


@pytest.mark.parametrize("loss_type", ["sppo_pair", "dpo"])
def test_pair_estimators_take_a_as_winner_and_b_as_loser(loss_type):
    rollout, _ = scored()
    [group] = build_groups(rollout, loss_type, ETA)
    assert [e.response_ids for e in group] == [[10], [11]]  # a, b
    assert [e.win_rate for e in group] == pytest.approx([WIN[0], WIN[1]])  # the soft win-rates, not 1 / 0
    # sppo_pair regresses onto η(P̂ − ½); DPO has no target (LOSSES["dpo"].target is None): 0s in the batch
    expected = [ETA * (WIN[0] - 0.5), ETA * (WIN[1] - 0.5)] if loss_type == "sppo_pair" else [0.0, 0.0]
    assert [e.target for e in group] == pytest.approx(expected)


def test_softmean_targets_by_hand():
    rollout, _ = scored()
    [group] = build_groups(rollout, "sppo_softmean", ETA)
    baseline = math.log(sum(math.exp(ETA * w) for w in WIN) / 3) / ETA  # (1/η) log mean exp(η r), r = win-rate
    assert [e.target for e in group] == pytest.approx([ETA * (w - baseline) for w in WIN])


def test_intransitive_cycle_gives_no_preference_signal():
    """a ≻ b ≻ c ≻ a, each with probability 0.9: every response wins as often as it loses."""
    rollout = rollout_of([["a", "b", "c"]])
    rollout = rollout.with_scores(TableJudge({("a", "b"): 0.9, ("b", "c"): 0.9, ("c", "a"): 0.9}).score(rollout))
    torch.testing.assert_close(rollout.win_rates, torch.full((1, 3), 0.5))
    assert all(e.target == 0.0 for e in build_groups(rollout, "sppo", ETA)[0])
    assert build_groups(rollout, "dpo", ETA) == []  # no winner for DPO


# ----------------------------------------------------------------------------------------- tiny real models
def test_reward_model_scores_each_conversation_as_alone(tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rollout = rollout_of([["4", "five", "\\boxed{4}"], ["a much longer response than the others", "x", "y"]])
    oracle = RewardModelOracle(str(tiny_classifier_dir), batch_size=4, dtype="float32")
    scores = oracle.score(rollout)

    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    expected = []
    for rec, texts in zip(rollout.prompts, rollout.response_text, strict=True):
        for text in texts:  # one at a time, no padding: batching must not change a score
            chat = tok.apply_chat_template(rec.messages + [{"role": "assistant", "content": text}], tokenize=False)
            ids = tok(chat, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                expected.append(model(**ids).logits[0, 0].item())
    torch.testing.assert_close(scores.rewards, torch.tensor(expected).view(2, 3), atol=1e-5, rtol=1e-5)
    s = scores.rewards
    torch.testing.assert_close(scores.win_rates[0, 0], torch.sigmoid(s[0, 0] - s[0]).mean())  # BT, incl. self
    assert next(oracle.classifier.model.parameters()).device.type == "cpu"  # offloaded after scoring


def test_pair_classifier_is_a_pairwise_oracle(tiny_classifier_dir):
    rollout = rollout_of([["1", "2", "3"], ["x", "yy", "zzz"]])
    oracle = PairClassifierOracle(str(tiny_classifier_dir), batch_size=5, dtype="float32")
    probs = oracle.preference_matrix(rollout)
    assert probs.shape == (2, 3, 3) and ((probs > 0) & (probs < 1)).all()
    scores = oracle.score(rollout)
    sym = (probs + 1 - probs.transpose(1, 2)) / 2
    torch.testing.assert_close(scores.win_rates, sym.mean(-1), atol=1e-6, rtol=0)  # diagonal ½ both ways
    torch.testing.assert_close(scores.win_rates.sum(-1), torch.full((2,), 1.5))  # win-rates sum to K/2


def test_pair_classifier_template_must_name_its_fields(tiny_classifier_dir):
    from sppo_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lacks \{second\}"):
        PairClassifierOracle(str(tiny_classifier_dir), template="{prompt} {first}")


# ------------------------------------------------------------------------------ an oracle returns, never mutates
def by_table(text: str, ground_truth: str) -> float:
    """A rule for the texts a, b, c: a is right, c is wrong, and it cannot score b (it raises)."""
    return {"a": 1.0, "c": 0.0}[text]


def oracle_named(name: str, request):
    from sppo_lightning.rewards.base import RuleOracle
    from sppo_lightning.rewards.pairrm import PairRMOracle
    from sppo_lightning.toy.judge import ClosenessJudge

    if name == "rule":
        return RuleOracle(by_table, max_unscored_share=0.5)
    if name == "table":
        return TableJudge(TABLE)
    if name == "closeness":
        return ClosenessJudge()
    if name == "reward_model":
        return RewardModelOracle(str(request.getfixturevalue("tiny_classifier_dir")), dtype="float32")
    if name == "pair_classifier":
        return PairClassifierOracle(str(request.getfixturevalue("tiny_classifier_dir")), dtype="float32")
    return PairRMOracle(str(request.getfixturevalue("tiny_pairrm_dir")))


@pytest.mark.filterwarnings("ignore:data.oracle.init_args.score_fn")  # the rule's unscorable b is reported
@pytest.mark.parametrize("name", ["rule", "table", "closeness", "reward_model", "pair_classifier", "pairrm"])
def test_an_oracle_leaves_the_rollout_as_it_was_and_keeps_nothing_between_rollouts(name, request):
    import copy

    oracle = oracle_named(name, request)
    rollout = rollout_of([["a", "b", "c"]])
    before = copy.deepcopy(rollout)
    first = oracle.score(rollout)
    assert rollout == before and rollout.rewards is None and rollout.win_rates is None  # nothing filled in
    assert first.rewards.shape == first.win_rates.shape == (1, 3)
    oracle.score(rollout_of([["c", "a", "b"], ["b", "c", "a"]]))  # another rollout in between
    again = oracle.score(rollout)
    assert torch.equal(again.rewards, first.rewards) and torch.equal(again.win_rates, first.win_rates)
    assert again.unscored == first.unscored
    scored = rollout.with_scores(first)  # the scored record is a new one, carrying exactly what was returned
    assert scored is not rollout and rollout.rewards is None
    assert (scored.rewards, scored.win_rates, scored.unscored) == (first.rewards, first.win_rates, first.unscored)


def test_the_rule_returns_its_values_and_its_unscored_count():
    """a = 1, b unscorable (0, a loss), c = 0; with each response against itself (½):
    P̂(a) = (½ + 1 + 1) / 3 = 5/6, P̂(b) = P̂(c) = (0 + ½ + ½) / 3 = 1/3."""
    from sppo_lightning.rewards.base import RuleOracle

    with pytest.warns(UserWarning, match=r"by_table\): 1 of 3 responses could not be scored and score 0"):
        scores = RuleOracle(by_table, max_unscored_share=0.5).score(rollout_of([["a", "b", "c"]]))
    assert scores.rewards.tolist() == [[1.0, 0.0, 0.0]]
    torch.testing.assert_close(scores.win_rates, torch.tensor([[5 / 6, 1 / 3, 1 / 3]]))
    assert scores.unscored == 1


def test_a_judge_returns_the_win_rates_by_hand_and_nothing_unscored():
    scores = TableJudge(TABLE, bias=0.1).score(rollout_of([["a", "b", "c"]]))
    torch.testing.assert_close(scores.win_rates, torch.tensor([WIN]))
    torch.testing.assert_close(scores.rewards, torch.tensor([WIN]))  # a pairwise judge's reward is the win-rate
    assert scores.unscored == 0


def test_an_oracle_written_for_the_old_api_gets_one_message_naming_it(tmp_path):
    """An oracle that fills in the rollout and returns nothing (the API before Scores) stops the run at its first
    rollout with one ConfigError naming the class, instead of an AttributeError deep in the pipeline."""
    from sppo_lightning.data.datamodule import RolloutDataModule
    from sppo_lightning.errors import ConfigError
    from sppo_lightning.rewards.base import Oracle
    from sppo_lightning.toy.task import AdditionPrompts

    class Mutating(Oracle):
        def score(self, rollout, device=None):
            rollout.rewards = rollout.win_rates = torch.zeros(rollout.num_prompts, rollout.group_size)

    dm = RolloutDataModule(train=AdditionPrompts(num_prompts=4), oracle=Mutating())
    rollout = Rollout([PromptRecord([{"role": "user", "content": "1+1"}], "2")], [[1]], [[[2], [3]]], [["2", "3"]])
    with pytest.raises(ConfigError, match=r"data.oracle .*Mutating.score returned NoneType: .*Scores"):
        dm.judge(rollout, torch.device("cpu"))
