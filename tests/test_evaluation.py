"""Validation metrics: accuracy overall, by level and subject, mean@k and pass@k, computed by hand."""

import pytest
import torch

from sppo_lightning.data.prompts import PromptRecord
from sppo_lightning.evaluation import GroupedAccuracy, group_keys
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
        shapes.add(tuple(len(b["prompt_ids"]) for b in batches))
        for b in batches:
            assert [[1, 10 + r.extra_info["index"]] for r in b["records"]] == b["prompt_ids"][: len(b["records"])]
            scored += [r.extra_info["index"] for r in b["records"]]
    assert sorted(scored) == list(range(num_prompts))
    assert len(shapes) == 1
