"""A loss type end to end: the pipeline lays out its rows (winner matched with its own loser), the step computes its
entry, and a fifth loss type is one new ``LOSSES`` entry.

The rollout and the oracle are fixed (the engine and the judge replaced), so every row's prompt, response and
win-rate is known; the rest is the real pipeline (``RolloutDataModule.train_dataloader``) and the real step.
"""

from dataclasses import replace

import lightning as L
import pytest
import torch

from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.errors import ConfigError
from sppo_lightning.loss import LOSSES, LossSpec, win_rate_targets
from sppo_lightning.module import SPPOModule
from sppo_lightning.preference import win_rates_from_rewards
from sppo_lightning.records import Rollout, Scores
from sppo_lightning.rewards.base import Oracle
from sppo_lightning.toy import MODEL_DIR, AdditionPrompts

ETA = 2.0
# prompt ids: (K = 4 responses, their rewards)
GROUPS = {
    (5, 6, 7): ([[20, 2], [21, 22, 2], [23, 2], [24, 25, 26, 2]], [0.0, 1.0, 0.5, 1.0]),
    (8, 9): ([[30, 2], [31, 2], [32, 33, 2], [34, 2]], [1.0, 1.0, 1.0, 1.0]),  # all tie
    (10, 11, 12, 13): ([[40, 2], [41, 42, 2], [43, 2], [44, 2]], [0.2, 0.0, 0.9, 0.4]),
}
# (winner, loser): the first of the best, the last of the worst (the tie: two different responses)
WINNER_LOSER = {(5, 6, 7): (1, 0), (8, 9): (0, 3), (10, 11, 12, 13): (2, 1)}


class FixedPipeline(RolloutDataModule):
    """The pipeline with the engine replaced by ``GROUPS`` (prompt i of the draw is the i-th group)."""

    def __init__(self, **kw):
        super().__init__(train=AdditionPrompts("train", num_prompts=len(GROUPS)), samples_per_prompt=4,
                         prompts_per_epoch=len(GROUPS), oracle=FixedRewards(), **kw)  # fmt: skip

    def generate(self, module, indices, seed):
        prompts = list(GROUPS)
        return Rollout(
            prompts=[self.train_prompts[i] for i in indices],
            prompt_ids=[list(prompts[i]) for i in indices],
            response_ids=[GROUPS[prompts[i]][0] for i in indices],
            response_text=[[""] * 4 for _ in indices],
        )


class FixedRewards(Oracle):
    def score(self, rollout, device=None):
        rewards = torch.tensor([GROUPS[tuple(p)][1] for p in rollout.prompt_ids])
        scores = Scores(rewards=rewards, win_rates=win_rates_from_rewards(rewards))
        rollout.rewards, rollout.win_rates = scores.rewards, scores.win_rates  # the pipeline as it reads them today
        return scores


class Watch(L.Callback):
    """Every micro-batch as the step receives it, and the step's logged loss."""

    def __init__(self):
        self.batches, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def fit(loss_type, max_steps=1, data_loss_type=None, data_eta=ETA, learning_rate=1e-3, **data_kw):
    L.seed_everything(0)
    module = SPPOModule(str(MODEL_DIR), loss_type=loss_type, eta=ETA, learning_rate=learning_rate, weight_decay=0.0)
    data = FixedPipeline(loss_type=data_loss_type or loss_type, eta=data_eta, **data_kw)
    watch = Watch()
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1, callbacks=[watch],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, watch


@pytest.mark.parametrize("loss_type", ["sppo_pair", "dpo", "ipo"])
def test_each_winner_reaches_the_loss_with_its_own_loser(loss_type, monkeypatch):
    """Through the real pipeline: every pair of the batch is one prompt's winner then that prompt's loser (their
    group, prompt, response and win-rate), and the loss entry receives exactly those pairs."""
    received = []
    spec = LOSSES[loss_type]

    def compute(terms, params):
        received.append(terms)
        return spec.compute(terms, params)

    monkeypatch.setitem(LOSSES, loss_type, replace(spec, compute=compute))
    _, watch = fit(loss_type, micro_batch_size=8)
    [batch], [terms] = watch.batches, received
    assert batch.paired
    groups = batch.pairs(batch.group)  # (G, 2)
    assert torch.equal(groups[:, 0], groups[:, 1])  # both rows of a pair come from one prompt ...
    assert len(set(groups[:, 0].tolist())) == len(groups)  # ... and every pair from another one
    expected_prompts = set(GROUPS) - ({(8, 9)} if spec.skips_ties else set())  # DPO/IPO: the all-tie prompt left out
    seen = set()
    pairs = (batch.pairs(batch.input_ids), batch.pairs(batch.prompt_lengths), batch.pairs(batch.win_rates))
    for ids, prompt_len, win_rates in zip(*pairs, strict=True):  # (2, T), (2,), (2,): winner, loser
        prompt = tuple(ids[0, : prompt_len[0]].tolist())
        assert tuple(ids[1, : prompt_len[1]].tolist()) == prompt
        responses, rewards = GROUPS[prompt]
        all_win_rates = win_rates_from_rewards(torch.tensor([rewards]))[0]
        winner, loser = WINNER_LOSER[prompt]
        for row, k in ((0, winner), (1, loser)):
            n = len(responses[k])
            assert ids[row, prompt_len[row] : prompt_len[row] + n].tolist() == responses[k]
            assert win_rates[row] == all_win_rates[k]
        assert win_rates[0] == all_win_rates.max() and win_rates[1] == all_win_rates.min()
        seen.add(prompt)
    assert seen == expected_prompts
    # the entry got the batch's pairs, winner first: targets η(P̂ − ½) for sppo_pair, none (0) for DPO and IPO
    wins = batch.pairs(batch.win_rates)
    want = ETA * (wins - 0.5) if loss_type == "sppo_pair" else torch.zeros_like(wins)
    assert torch.equal(terms.targets, want)
    assert terms.logps.shape == terms.ref_logps.shape == (len(expected_prompts), 2)
    assert torch.equal(terms.ref_logps, batch.pairs(batch.ref_logps.sum(-1)))


@pytest.mark.parametrize("loss_type", ["sppo_pair", "dpo"])
def test_the_first_step_loss_of_a_pair_loss_by_hand(loss_type):
    """At π_t every log-ratio is 0: sppo_pair's loss is the mean over pairs of (t_w² + t_l²) / 2, DPO's log 2."""
    _, watch = fit(loss_type, micro_batch_size=8)
    targets = watch.batches[0].pairs(watch.batches[0].targets)
    expected = ((targets**2).sum(-1) / 2).mean() if loss_type == "sppo_pair" else torch.log(torch.tensor(2.0))
    assert watch.losses[0] == pytest.approx(float(expected), rel=1e-5)
    if loss_type == "sppo_pair":  # winners (0.5 + 1 + ... ) above ½, losers below: not a vacuous 0
        assert expected > 0.1


def test_a_fifth_loss_type_is_one_new_entry_and_it_trains(monkeypatch):
    """An L1 regression onto η(P̂ − ½): one ``LOSSES`` entry, nothing else. The pipeline lays its rows out (all K,
    the targets), the datamodule checks its needs, the step computes it, and repeated steps on one rollout bring
    its loss down from mean |target| at π_t."""
    monkeypatch.setitem(
        LOSSES,
        "sppo_l1",
        LossSpec(
            lambda x, p: (x.logps - x.ref_logps - x.targets).abs(),
            paired=False,
            target=win_rate_targets,
            min_samples=2,
            min_samples_why="win-rates within a prompt's samples",
            clip=True,
        ),
    )
    with pytest.raises(ConfigError, match=r"model.loss_type=sppo_l1 needs data.samples_per_prompt >= 2"):
        RolloutDataModule(train=None, samples_per_prompt=1, micro_batch_size=4, loss_type="sppo_l1")
    _, watch = fit("sppo_l1", max_steps=-1, learning_rate=1e-5, micro_batch_size=12, passes_per_rollout=6)
    batch = watch.batches[0]
    assert not batch.paired and len(batch) == 12  # all K = 4 rows of the 3 prompts
    assert torch.equal(batch.targets, ETA * (batch.win_rates - 0.5))
    assert watch.losses[0] == pytest.approx(float(batch.targets.abs().mean()), rel=1e-5)  # at π_t
    assert len(watch.losses) == 6 and watch.losses[-1] < 0.8 * watch.losses[0]


def test_halves_built_in_python_with_different_settings_stop_at_setup():
    with pytest.raises(ConfigError, match=r"model.loss_type='dpo' but data.loss_type='sppo'; model.eta=2.0 but data"):
        fit("dpo", data_loss_type="sppo", data_eta=1.0)
