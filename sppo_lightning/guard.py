"""Skip a step whose loss or gradient is not finite, on every rank together; stop past a limit.

A NaN or inf in one micro-batch's loss, or in a step's gradient, should cost that step, not the run: the step is
skipped and counted. Under several processes every rank must skip together (the others would wait in the gradient
reduction forever), so "finite" is decided over all ranks through the reduce function the guard is given. Too many
skipped steps in a row mean the run has diverged: it stops with one message.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sppo_lightning.errors import DivergenceError

CHECKPOINT_KEY = "sppo_skipped_steps"
"""Where the count lives in a Lightning checkpoint (the key the module saved it under before the guard existed)."""


class NonFiniteGuard:
    """Counts skipped steps (``skipped_steps``, kept in checkpoints) and the current streak of them (not kept: a
    resumed run starts a new streak)."""

    def __init__(self, limit: int, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """
        Args:
            limit: This many skipped steps in a row raise ``DivergenceError``; 0 = never.
            sum_over_ranks: A tensor summed over every rank (None: a single process).
        """
        self.limit = limit
        self.sum_over_ranks = sum_over_ranks
        self.skipped_steps = 0
        self.in_a_row = 0

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (the same answer on all of them)."""
        bad = torch.tensor(float(not torch.isfinite(value).all()), device=value.device)
        if self.sum_over_ranks is not None:
            bad = self.sum_over_ranks(bad)
        return bool(bad == 0)

    def skip(self, what: str, step: int) -> None:
        """Count a skipped step, whose ``what`` (loss, gradient) was not finite at global step ``step``; raise once
        ``limit`` steps in a row were skipped."""
        self.skipped_steps += 1
        self.in_a_row += 1
        if self.limit and self.in_a_row >= self.limit:
            raise DivergenceError(
                f"training stopped: {self.in_a_row} steps in a row had a non-finite {what} (last at global step "
                f"{step}). Lower model.learning_rate or model.eta, or raise model.max_nonfinite_steps"
            )

    def passed(self) -> None:
        """A step went through: the streak ends."""
        self.in_a_row = 0

    def save(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.skipped_steps

    def load(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get(CHECKPOINT_KEY, 0)
