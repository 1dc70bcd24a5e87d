"""The per-iteration record (sppo_lightning/phases.py): the rollout's metrics and the phase times, once per iteration,
whatever callbacks the Trainer was given."""

import csv

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.module import SPPOModule
from sppo_lightning.phases import IterationRecord
from sppo_lightning.toy import AdditionPrompts


def fit_toy(tmp_path, toy_model_dir, callbacks, engine=None, epochs=2, prompts=4, **trainer_kw) -> list[dict]:
    """``epochs`` toy iterations (``prompts`` x 4 samples: a step per 4 prompts; 4 validation prompts in one batch),
    logged to a CSV file: its rows."""
    L.seed_everything(0)
    data = RolloutDataModule(
        train=AdditionPrompts("train", num_prompts=32), val=AdditionPrompts("val", num_prompts=4), engine=engine,
        prompts_per_epoch=prompts, samples_per_prompt=4, max_response_length=8, micro_batch_size=16, val_batch_size=4,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", reload_dataloaders_every_n_epochs=1, logger=CSVLogger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=callbacks, **trainer_kw,
    )  # fmt: skip
    trainer.fit(SPPOModule(str(toy_model_dir), learning_rate=1e-3), datamodule=data)
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        return list(csv.DictReader(f))


class RolloutMetricsSeen(L.Callback):
    """What the datamodule computed for each iteration's rollout (before the record logs it: user callbacks run
    first)."""

    def __init__(self):
        self.per_epoch: list[dict[str, float]] = []
        self.records = 0  # IterationRecords the Trainer runs

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_epoch.append(dict(trainer.datamodule.rollout_metrics))
        self.records = sum(isinstance(c, IterationRecord) for c in trainer.callbacks)


@pytest.mark.parametrize(
    "listed", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["installed by the module", "listed by the user"]
)
def test_rollout_metrics_reach_metrics_csv_once_per_iteration(tmp_path, toy_model_dir, listed):
    """Each iteration's row holds the datamodule's rollout metrics (rewards, lengths, ties, the pipeline's stage times)
    with the values it computed, in one row per iteration: the module installs the record itself, and a Trainer that
    lists one too does not log twice."""
    seen = RolloutMetricsSeen()
    rows = fit_toy(tmp_path, toy_model_dir, [seen, *([IterationRecord()] if listed else [])])
    assert len(seen.per_epoch) == 2 and seen.records == 1
    for epoch, computed in enumerate(seen.per_epoch):
        assert {"rollout/reward_mean", "rollout/all_tie_share", "time/rollout", "time/scoring"} <= computed.keys()
        logged = [r for r in rows if r["epoch"] == str(epoch) and r.get("rollout/reward_mean")]
        assert len(logged) == 1, logged
        for name, value in computed.items():
            assert float(logged[0][name]) == pytest.approx(value, rel=1e-6, abs=1e-7), name  # float32 in the log
    for name in ("time/train", "time/validation", "rollout/reward_mean"):  # one row per iteration, epoch -1 aside
        assert sorted(int(r["epoch"]) for r in rows if r.get(name) and r["epoch"] != "-1") == [0, 1], name


@pytest.mark.slow
def test_time_train_excludes_validation_before_and_after_the_last_step(tmp_path, toy_model_dir):
    """Validation made 3 s slower and run twice in the iteration (after each of its 2 steps): time/validation holds
    both runs, time/train, the training loop only, neither the one between the steps nor the one after the last."""
    from tests.engines import SlowValidation

    slow = SlowValidation(seconds=3.0)
    rows = fit_toy(tmp_path, toy_model_dir, [], engine=slow, epochs=1, prompts=8, val_check_interval=0.5)
    validation = {int(r["epoch"]): float(r["time/validation"]) for r in rows if r.get("time/validation")}
    train = {int(r["epoch"]): float(r["time/train"]) for r in rows if r.get("time/train")}
    assert sorted(validation) == [-1, 0] and validation[-1] >= 3.0, validation  # the evaluation before training
    assert validation[0] >= 6.0, validation  # two validations
    assert list(train) == [0] and train[0] < 3.0, train  # two toy steps
    assert sum(bool(r.get("val/accuracy")) for r in rows) == 3  # before training, then twice in the iteration
