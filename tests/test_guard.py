"""The non-finite guard: every rank skips together, a NaN anywhere in an accumulated step skips that whole step,
streaks (of steps) stop the run past the limit, the count is kept."""

import lightning as L
import pytest
import torch

from sppo_lightning.errors import DivergenceError
from sppo_lightning.guard import NonFiniteGuard
from sppo_lightning.module import SPPOModule
from sppo_lightning.toy import MODEL_DIR
from tests.test_step_gradient import FixedRollout, fixed_groups


def test_a_nan_on_another_rank_skips_the_step_on_this_one():
    other_rank_bad = NonFiniteGuard(10, sum_over_ranks=lambda bad: bad + 1)  # the other rank reports 1 bad value
    assert not other_rank_bad.all_finite(torch.tensor(0.5))
    all_good = NonFiniteGuard(10, sum_over_ranks=lambda bad: bad * 2)  # two ranks, both with this rank's verdict
    assert all_good.all_finite(torch.tensor(0.5))
    assert not all_good.all_finite(torch.tensor([0.5, float("inf")]))
    assert NonFiniteGuard(10).all_finite(torch.tensor(1.0)) and not NonFiniteGuard(10).all_finite(
        torch.tensor(float("nan"))
    )


def test_only_a_streak_of_limit_skips_stops_the_run_and_the_total_survives_a_checkpoint():
    guard = NonFiniteGuard(limit=3)
    guard.skip("loss", step=4)
    guard.skip("gradient", step=5)
    guard.passed()  # a step went through: the streak starts again
    guard.skip("loss", step=7)
    guard.skip("loss", step=8)
    with pytest.raises(DivergenceError, match=r"3 steps in a row had a non-finite gradient \(last at global step 9\)"):
        guard.skip("gradient", step=9)
    assert guard.skipped_steps == 5
    checkpoint = {}
    guard.save(checkpoint)
    resumed = NonFiniteGuard(limit=3)
    resumed.load(checkpoint)
    assert resumed.skipped_steps == 5 and resumed.in_a_row == 0
    resumed.load({})  # a checkpoint from before any skip was counted
    assert resumed.skipped_steps == 0
    never = NonFiniteGuard(limit=0)
    for step in range(100):
        never.skip("loss", step)
    assert never.skipped_steps == 100


class NaNAt(L.Callback):
    """A NaN target (a NaN loss) in the micro-batches at these positions of the first optimizer step."""

    def __init__(self, positions):
        self.positions = set(positions)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx in self.positions:
            batch.targets[0] = float("nan")


def first_step_with_nan(accumulate: int, positions) -> tuple[SPPOModule, L.Trainer, dict]:
    """One optimizer step of ``accumulate`` micro-batches (one group of 2 rows each) with NaN losses at
    ``positions``; weight decay on, so that any AdamW step would move every matrix."""
    L.seed_everything(0)
    module = SPPOModule(str(MODEL_DIR), eta=2.0, learning_rate=1e-3, weight_decay=0.01, weight_decay_on="all")
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, reload_dataloaders_every_n_epochs=1,
        callbacks=[NaNAt(positions)],
    )  # fmt: skip
    trainer.fit(module, datamodule=FixedRollout(fixed_groups(accumulate), eta=2.0, micro_batch_size=2))
    return module, trainer, before


@pytest.mark.parametrize(("accumulate", "position"), [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)], ids=lambda v: str(v))
def test_a_nan_anywhere_in_an_accumulated_step_skips_the_whole_step(accumulate, position):
    """Before, the other micro-batches' gradient still stepped (every parameter changed, 1 skip counted)."""
    module, trainer, before = first_step_with_nan(accumulate, {position})
    assert trainer.global_step == 1 and module.guard.skipped_steps == 1
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1
    assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items())  # nothing moved
    assert not trainer.optimizers[0].state  # AdamW never stepped: no moments


def test_the_streak_counts_steps_not_micro_batches():
    """Two NaN micro-batches in one step of 3: one skipped step (before: 2, and the step still went through)."""
    module, _, _ = first_step_with_nan(3, {0, 2})
    assert module.guard.skipped_steps == 1 and module.guard.in_a_row == 1
