"""The non-finite guard: every rank skips together, streaks stop the run past the limit, the count is kept."""

import pytest
import torch

from sppo_lightning.errors import DivergenceError
from sppo_lightning.guard import NonFiniteGuard


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
