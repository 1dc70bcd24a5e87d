"""An end-of-fit summary: accuracy before -> after and where the time went, as a small table."""

from __future__ import annotations

from collections import defaultdict

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

PHASES = ("time/rollout", "time/scoring", "time/ref_logprobs", "time/train")


class FitSummary(L.Callback):
    """Collects ``val/accuracy`` and the per-phase times each epoch and prints them when fit ends."""

    def __init__(self) -> None:
        self.accuracy: list[float] = []
        self.seconds: dict[str, float] = defaultdict(float)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Callback hooks run before the module's, so the module's pre-training accuracy is read here, not in
        # on_train_start.
        if not self.accuracy and getattr(pl_module, "initial_val_accuracy", None) is not None:
            self.accuracy.append(pl_module.initial_val_accuracy)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/accuracy" in trainer.callback_metrics:
            self.accuracy.append(float(trainer.callback_metrics["val/accuracy"]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for name in PHASES:
            if name in trainer.callback_metrics:
                self.seconds[name] += float(trainer.callback_metrics[name])

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"SPPO: {trainer.current_epoch} iterations")
        table.add_column("")
        table.add_column("value", justify="right")
        if self.accuracy:
            table.add_row("val/accuracy", f"{self.accuracy[0]:.1%} -> {self.accuracy[-1]:.1%}")
        total = sum(self.seconds.values()) or 1.0
        for name in PHASES:
            if name in self.seconds:
                table.add_row(name, f"{self.seconds[name]:.1f} s ({self.seconds[name] / total:.0%})")
        Console().print(table)
