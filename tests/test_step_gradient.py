"""An optimizer step's gradient is the mean over every loss term of that step, whatever the split of its rows into
micro-batches (by rows or by a token budget, a partial one, a short last accumulation window), and rows with an
empty response do not count. Under gradient accumulation, several passes over a rollout align with its windows.

The rows go through the real pipeline (``RolloutDataModule.train_dataloader``) with the rollout and the oracle
fixed, so that the split is the only thing that changes.
"""

import random

import lightning as L
import pytest
import torch

from sppo_lightning.data.batching import collate
from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.data.examples import Example
from sppo_lightning.logprobs import response_token_logps
from sppo_lightning.loss import sppo_loss
from sppo_lightning.module import SPPOModule
from sppo_lightning.preference import win_rates_from_rewards
from sppo_lightning.records import Scores
from sppo_lightning.rewards.base import Oracle
from sppo_lightning.rollout.base import Rollout
from sppo_lightning.toy import MODEL_DIR, AdditionPrompts

ETA = 2.0


def fixed_groups(n_groups: int = 4, empty: bool = False) -> list[tuple[list[int], list[list[int]], list[float]]]:
    """(prompt ids, 2 responses, 2 rewards) per group, uneven lengths; ``empty``: one more group whose first
    response has no token."""
    rng = random.Random(0)
    groups = []
    for g in range(n_groups):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randrange(4, 12))]
        responses = [[rng.randrange(3, 200) for _ in range(rng.randrange(2, 12))] for _ in range(2)]
        groups.append((prompt, responses, [float(g % 2), 1.0 - g % 2]))
    if empty:
        groups.append(([5, 6, 7], [[], [8, 9, 10]], [0.0, 1.0]))
    return groups


class FixedRollout(RolloutDataModule):
    """The pipeline with the engine and the oracle replaced by fixed groups: prompt i of the draw is group i."""

    def __init__(self, groups, **kw):
        super().__init__(train=AdditionPrompts("train", num_prompts=len(groups)), samples_per_prompt=2,
                         prompts_per_epoch=len(groups), oracle=FixedRewards(groups), **kw)  # fmt: skip
        self.groups = groups

    def generate(self, module, indices, seed):
        return Rollout(
            prompts=[self.train_prompts[i] for i in indices],
            prompt_ids=[self.groups[i][0] for i in indices],
            response_ids=[self.groups[i][1] for i in indices],
            response_text=[["", ""] for _ in indices],
        )


class FixedRewards(Oracle):
    def __init__(self, groups):
        self.by_prompt = {tuple(p): r for p, _, r in groups}

    def score(self, rollout, device=None):
        rewards = torch.tensor([self.by_prompt[tuple(p)] for p in rollout.prompt_ids])
        return Scores(rewards=rewards, win_rates=win_rates_from_rewards(rewards))


class Record(L.Callback):
    """Every optimizer step's gradient, and the micro-batches (their groups, filler or not) each step ran."""

    def __init__(self):
        self.grads, self.steps, self._current = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = tuple(sorted(set(batch.group.tolist())))
        self._current.append(("filler" if batch.filler else "rows", groups))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.policy.named_parameters()})
        self.steps.append(self._current)
        self._current = []


def fit(groups, accumulate: int, max_steps: int = 1, max_epochs: int | None = None, packed: bool = False, **data_kw):
    L.seed_everything(0)
    module = SPPOModule(str(MODEL_DIR), loss_type="sppo", eta=ETA, learning_rate=1e-3, weight_decay=0.0,
                        packed=packed)  # fmt: skip
    record = Record()
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=max_epochs, accelerator="cpu", accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, datamodule=FixedRollout(groups, eta=ETA, **data_kw))
    return record


def mean_gradient(groups) -> dict[str, torch.Tensor]:
    """By hand: one padded forward over every row with a response, the mean of their SPPO losses, at π_t."""
    module = SPPOModule(str(MODEL_DIR))
    module.configure_model()
    rows = []
    for g, (prompt, responses, rewards) in enumerate(groups):
        win = win_rates_from_rewards(torch.tensor([rewards]))[0]
        rows += [Example(prompt, r, 0.0, float(w), 0.0, g) for r, w in zip(responses, win, strict=True) if r]
    b = collate(rows, pad_id=0)
    module.policy.eval()  # as the π_t pass: the toy model has no dropout, so train mode gives the same numbers
    logps = response_token_logps(module.policy, b.input_ids, b.attention_mask, b.response_mask).sum(-1)
    sppo_loss(logps, logps.detach(), b.win_rates, ETA).mean().backward()
    return {n: p.grad.clone() for n, p in module.policy.named_parameters()}


def assert_same_gradient(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * max(float(grad.abs().max()), 1), msg=name)


# (settings, micro-batches of the step); the 4 groups carry 42, 37, 29 and 22 tokens
SPLITS = {
    "1x8": (dict(accumulate=1, micro_batch_size=8), 1),
    "2x4": (dict(accumulate=2, micro_batch_size=4), 2),
    "6+2 (a partial micro-batch)": (dict(accumulate=2, micro_batch_size=6), 2),
    "60-token budget (42, 37+22, 29) in a window of 4": (dict(accumulate=4, max_tokens_per_micro_batch=60), 3),
    "4x2 in a window of 8 (short last window)": (dict(accumulate=8, micro_batch_size=2), 4),
    "2x4 packed": (dict(accumulate=2, micro_batch_size=4, packed=True), 2),
}


@pytest.mark.parametrize(("split", "micro_batches"), SPLITS.values(), ids=SPLITS.keys())
def test_a_steps_gradient_is_the_mean_over_its_rows_whatever_the_split(split, micro_batches):
    groups = fixed_groups()
    record = fit(groups, **split)
    assert len(record.grads) == 1
    assert [kind for kind, _ in record.steps[0]] == ["rows"] * micro_batches
    assert_same_gradient(record.grads[0], mean_gradient(groups))


def test_rows_with_an_empty_response_do_not_count_in_the_mean():
    """verl masks them: the step is the mean over the 9 rows with a response, not over all 10."""
    groups = fixed_groups(empty=True)
    record = fit(groups, accumulate=1, micro_batch_size=10)
    assert_same_gradient(record.grads[0], mean_gradient(groups))


def test_several_passes_go_over_the_same_steps_and_no_step_mixes_passes():
    """4 groups (8 rows), 4 rows a step, micro-batches of 2 rows, 2 passes: each pass is the same 2 steps of 2
    micro-batches (each group once a pass), so no step holds the end of one pass and the start of the next."""
    record = fit(fixed_groups(4), accumulate=1, max_steps=-1, micro_batch_size=2, rows_per_step=4,
                 passes_per_rollout=2, max_epochs=1)  # fmt: skip
    assert len(record.steps) == 4
    first_pass = sorted(groups for step in record.steps[:2] for _, groups in step)
    assert first_pass == [(0,), (1,), (2,), (3,)]  # each micro-batch of the rollout exactly once in the pass
    assert sorted(groups for step in record.steps[2:] for _, groups in step) == first_pass
    assert {tuple(g for _, g in step) for step in record.steps[:2]} == {tuple(g for _, g in step) for step in
                                                                        record.steps[2:]}  # fmt: skip
    assert all(kind == "rows" for step in record.steps for kind, _ in step)
