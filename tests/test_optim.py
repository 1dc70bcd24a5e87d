"""Weight-decay groups and the learning-rate warm-up: by hand on the pure functions, then through a real fit."""

import lightning as L
import pytest

from sppo_lightning.module import SPPOModule
from sppo_lightning.optim import clean_name, decay_groups, param_ndims, warmup_factor


def test_warmup_per_step_and_per_rollout_by_hand():
    # per optimizer step (ours): the first step already moves at 1/15 of the rate, full rate at step 14
    assert [warmup_factor(k, 15, "step") for k in (0, 1, 13, 14, 15, 100)] == [1 / 15, 2 / 15, 14 / 15, 1, 1, 1]
    # per rollout (verl: get_constant_schedule_with_warmup stepped once per update_actor): rollout 0 at lr 0,
    # rollout k at k/15, rollout 15 at the full rate
    assert [warmup_factor(k, 15, "rollout") for k in (0, 1, 14, 15, 139)] == [0.0, 1 / 15, 14 / 15, 1.0, 1.0]
    assert warmup_factor(0, 0, "rollout") == warmup_factor(0, 0, "step") == 1.0  # no warm-up


def test_decay_groups_spare_biases_and_norms_unless_all(tiny_model_dir):
    module = SPPOModule(str(tiny_model_dir))
    module.configure_model()
    named = list(module.named_parameters())
    decayed, spared = decay_groups(named, 0.01, "matrices", module._param_ndims)
    assert (decayed["weight_decay"], spared["weight_decay"]) == (0.01, 0.0)
    assert spared["names"] and all(n.endswith(".bias") or "norm" in n for n in spared["names"])
    assert all(p.ndim >= 2 for p in decayed["params"]) and len(decayed["names"]) + len(spared["names"]) == len(named)
    decayed, spared = decay_groups(named, 0.01, "all")  # verl: every parameter
    assert len(decayed["names"]) == len(named) and not spared["names"]


def test_decay_groups_come_from_shapes_recorded_before_flattening(tiny_model_dir):
    """What FSDP1 does to the live parameters (1-D local shards, wrapper segments in the names) changes nothing."""
    module = SPPOModule(str(tiny_model_dir))
    module.configure_model()
    named = list(module.named_parameters())
    expected = decay_groups(named, 0.01, "matrices")
    flat = [(n.replace("layers.0.", "layers.0._fsdp_wrapped_module."), p.detach().reshape(-1)) for n, p in named]
    for f in flat:
        f[1].requires_grad_(True)
    got = decay_groups(flat, 0.01, "matrices", param_ndims(named))
    assert [g["names"] for g in got] == [g["names"] for g in expected]
    assert clean_name("policy.model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight") == (
        "policy.model.layers.0.mlp.up_proj.weight"
    )
    # today's rule on the live tensors would spare everything under FSDP1: the bug of issue #22
    assert not [p for _, p in flat if p.ndim >= 2]


class LearningRates(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append((trainer.current_epoch, optimizer.param_groups[0]["lr"]))


@pytest.mark.parametrize(
    "unit, expected",
    [
        ("rollout", [(0, 0.0), (0, 0.0), (1, 0.5), (1, 0.5), (2, 1.0), (2, 1.0)]),  # verl: rollout 0 at lr 0
        ("step", [(0, 0.5), (0, 1.0), (1, 1.0), (1, 1.0), (2, 1.0), (2, 1.0)]),
    ],
)
def test_learning_rate_of_every_optimizer_step_in_a_fit(tiny_model_dir, unit, expected):
    """3 iterations x 2 optimizer steps (8 prompts x 4 samples, micro-batches of 16), warm-up length 2."""
    from sppo_lightning.data.datamodule import RolloutDataModule
    from sppo_lightning.toy import AdditionPrompts

    lr = 1e-5
    module = SPPOModule(str(tiny_model_dir), learning_rate=lr, warmup_steps=2, warmup_unit=unit)
    data = RolloutDataModule(
        train=AdditionPrompts("train", num_prompts=32), prompts_per_epoch=8, samples_per_prompt=4,
        max_response_length=4, micro_batch_size=16,
    )  # fmt: skip
    record = LearningRates()
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", reload_dataloaders_every_n_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert [(e, x / lr) for e, x in record.lrs] == [(e, pytest.approx(f)) for e, f in expected]
