"""Optimizer steps on 2 CPU processes (gloo), through the real pipeline (tests/steps_fit.py in a subprocess): the
same steps as one process under a token budget, a rank whose groups all tie still lets the other train, and a NaN
in an accumulated step skips it whole under FSDP2 and FSDP1."""

import json

import pytest

from tests import forked
from tests.test_cli import REPO


def fit(tmp_path, devices: int, *flags: str) -> list[dict]:
    """Each rank's record (``steps_fit.py``), rank 0 first."""
    out = tmp_path / "result"
    proc = forked.run(
        [str(REPO / "tests" / "steps_fit.py"), "--devices", str(devices), "--out", str(out), *flags],
        timeout=900,
        ranks=devices,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.slow
def test_two_processes_make_the_steps_of_one_under_a_token_budget(tmp_path):
    """16 groups of 2 rows, 8 rows a step, a 60-token budget: 4 steps of 8 rows over both ranks, as on one process
    (tests/data/test_steps.py covers 1 to 8 simulated ranks and the 7B shape)."""
    ranks = fit(tmp_path, 2, "--rows-per-step", "8", "--max-tokens", "60")
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert [a["rows"] + b["rows"] for a, b in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True)] == [8] * 4
    assert ranks[0]["metrics"]["rollout/optimizer_steps"] == 4


@pytest.mark.slow
def test_a_rank_whose_groups_all_tie_trains_fillers_and_the_other_still_steps(tmp_path):
    """DPO drops all-tie groups; every group on rank 1 ties. Before, no rank trained that iteration."""
    ranks = fit(tmp_path, 2, "--loss-type", "dpo", "--tie-rank", "1")
    # micro-batches of 2 rows, no rows_per_step: 2 x 1 x 2 processes = 4 rows a step, 16 pairs = 32 rows: 8 steps
    assert [r["global_step"] for r in ranks] == [8, 8]
    assert all(step["rows"] == 0 for step in ranks[1]["steps"]) and ranks[1]["metrics"]["rollout/dropped_groups"] == 8
    assert ranks[1]["metrics"]["rollout/filler_micro_batches"] == 8  # one filler a step on the tied rank
    assert all(step["rows"] == 2 for step in ranks[0]["steps"]) and ranks[0]["metrics"]["rollout/dropped_groups"] == 0
    assert ranks[0]["changed"] and ranks[1]["changed"]  # rank 0's pairs moved the weights, rank 1's shards included


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "position"), [("fsdp2", 1), ("fsdp1", 0)])
def test_a_nan_in_an_accumulated_sharded_step_skips_it_whole(tmp_path, strategy, position):
    """Windows of 2 micro-batches, a NaN loss in one of each window's on every rank: 4 steps, each
    skipped, no shard moved. Before, the other micro-batch's gradient stepped."""
    flags = ["--accumulate", "2", "--nan-at", str(position)] + (["--fsdp1"] if strategy == "fsdp1" else [])
    ranks = fit(tmp_path, 2, *flags)
    assert [r["global_step"] for r in ranks] == [4, 4] and [r["skipped_steps"] for r in ranks] == [4, 4]
    assert not ranks[0]["changed"] and not ranks[1]["changed"]


def test_an_iteration_where_every_group_ties_makes_no_step_and_says_how_many_tied():
    import lightning as L

    from sppo_lightning.module import SPPOModule
    from sppo_lightning.toy import MODEL_DIR
    from tests.test_step_gradient import FixedRollout, fixed_groups

    groups = [(prompt, responses, [1.0, 1.0]) for prompt, responses, _ in fixed_groups(4)]  # every pair ties
    module = SPPOModule(str(MODEL_DIR), loss_type="dpo", weight_decay=0.01)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, reload_dataloaders_every_n_epochs=1,
    )  # fmt: skip
    data = FixedRollout(groups, loss_type="dpo", micro_batch_size=2)
    with pytest.warns(UserWarning, match="all 4 groups of this iteration dropped out"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0 and data.rollout_metrics["rollout/dropped_groups"] == 4
