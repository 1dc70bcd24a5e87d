"""An end-of-fit summary: accuracy before -> after, the run's health (first -> last iteration) and where the time
went, as a small table."""

from __future__ import annotations

from collections import defaultdict

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from callbacks.history import earlier_rows, values

PHASES = ("time/rollout", "time/scoring", "time/ref_logprobs", "time/train", "time/validation")
HEALTH = (
    "train/entropy", "train/kl_pi_t", "train/kl_initial", "rollout/logprob_gap_mean", "rollout/logprob_gap_max",
    "rollout/truncated_share",
)  # fmt: skip


class FitSummary(L.Callback):
    """Collects ``val/accuracy`` and the per-phase times each epoch and prints them when fit ends."""

    # A config's callbacks run before the module's hooks (which log the accuracy in on_validation_epoch_end) and
    # before phases.IterationRecord (the module's own callback, which logs the epoch's times in on_train_epoch_end),
    # so values are read one hook later: accuracy in on_validation_end, an epoch's times at the start of the next
    # epoch and, for the last one, at the end of fit.

    def __init__(self) -> None:
        self.accuracy: list[float] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.health: dict[str, list[float]] = {}  # per iteration, first and last shown
        self.epochs = 0
        self._resumed_epochs = 0  # iterations done before this process started (a resume)

    def _add_epoch_times(self, trainer) -> None:
        for name in PHASES:
            if name in trainer.callback_metrics:
                self.seconds[name] += float(trainer.callback_metrics[name])
        for name in HEALTH:  # logged once per iteration, with the times
            if name in trainer.callback_metrics:
                self.health.setdefault(name, []).append(float(trainer.callback_metrics[name]))

    def on_train_start(self, trainer, pl_module) -> None:  # after the checkpoint's loops are restored
        """After a resume, start from what the earlier parts of the run measured (their metrics.csv)."""
        rows = earlier_rows(trainer)
        epochs = {e for e, _ in values(rows, "time/train")}
        self.accuracy = [v for _, v in values(rows, "val/accuracy")]
        for name in PHASES:
            for _, v in values(rows, name):
                self.seconds[name] += v
        self.health = {name: [v for _, v in values(rows, name)] for name in HEALTH}
        self.health = {name: v for name, v in self.health.items() if v}
        self.epochs = len(epochs)
        self._resumed_epochs = self.epochs

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.epochs > self._resumed_epochs:
            self._add_epoch_times(trainer)
        elif not self.epochs and getattr(pl_module, "initial_val_accuracy", None) is not None:  # from on_train_start
            self.accuracy.append(pl_module.initial_val_accuracy)
            self.seconds["time/validation"] += pl_module.initial_val_seconds or 0.0
        self.epochs += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/accuracy" in trainer.callback_metrics:
            self.accuracy.append(float(trainer.callback_metrics["val/accuracy"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.epochs > self._resumed_epochs:
            self._add_epoch_times(trainer)
        self._print(trainer)

    @rank_zero_only
    def _print(self, trainer) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"SPPO: {self.epochs} iterations" + (" (resumed)" if trainer.ckpt_path else ""))
        table.add_column("")
        table.add_column("value", justify="right")
        if len(self.accuracy) > 1:
            table.add_row("val/accuracy", f"{self.accuracy[0]:.1%} -> {self.accuracy[-1]:.1%}")
        elif self.accuracy:
            table.add_row("val/accuracy", f"{self.accuracy[0]:.1%}")
        for name in HEALTH:
            if self.health.get(name):
                first, last = self.health[name][0], self.health[name][-1]
                table.add_row(name, f"{first:.3g} -> {last:.3g}" if len(self.health[name]) > 1 else f"{last:.3g}")
        total = sum(self.seconds.values()) or 1.0
        for name in PHASES:
            if name in self.seconds:
                table.add_row(name, f"{self.seconds[name]:.1f} s ({self.seconds[name] / total:.0%})")
        Console().print(table)
