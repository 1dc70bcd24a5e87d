"""Learning curves as a picture: accuracy, rollout reward and training loss per iteration, and below them the run's
health: the policy's entropy, its KL to π_t and to the starting policy, and the sampler-vs-trainer log-prob gap.

Drawn into ``<default_root_dir>/curves.png`` after a validation (and logged to wandb as an image when a wandb logger is
configured), at most once every ``every_s`` seconds counted from the fit's start, and always at the end of fit or when
the run stops: a drawing costs ~0.7 s of CPU, which every iteration of the 1-second-per-iteration demo would pay (15
of its 50 s), and a run shorter than ``every_s`` draws once, at its end.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from callbacks.history import earlier_rows, values

HEALTH = ("train/entropy", "train/kl_pi_t", "train/kl_initial")
"""Logged by the module's record at each iteration's end, after that iteration's validation picture: they join the
curves at the next iteration's start (and at the end of fit)."""
GAP = "rollout/logprob_gap_mean"


class LearningCurves(L.Callback):
    def __init__(self, filename: str = "curves.png", every_s: float = 30.0):
        """
        Args:
            filename: File under ``trainer.default_root_dir``.
            every_s: Least seconds between the fit's start or the last picture and a picture drawn after a
                validation (0: after every validation). The end of fit and a stopped run draw whatever the time.
        """
        self.filename = filename
        self.every_s = every_s
        self._drawn_at = time.monotonic()  # of the last picture, or the fit's start (on_fit_start)
        self.accuracy: list[tuple[int, float]] = []  # (iterations done, accuracy)
        self.reward: list[tuple[int, float]] = []
        self.loss: list[tuple[int, float]] = []
        self.health: dict[str, list[tuple[int, float]]] = {name: [] for name in (*HEALTH, GAP)}
        self._losses: list[float] = []
        self._logged_step: int | None = None  # wandb gets the picture once per iteration

    def on_fit_start(self, trainer, pl_module) -> None:
        self._drawn_at = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:  # after the checkpoint's loops are restored
        """After a resume, the curves start from the run's beginning (the earlier parts' metrics.csv)."""
        rows = earlier_rows(trainer)
        self.accuracy = [(e + 1, v) for e, v in values(rows, "val/accuracy")]
        self.reward = [(e + 1, v) for e, v in values(rows, "rollout/reward_mean")]
        losses: dict[int, list[float]] = {}
        for e, v in values(rows, "train/loss"):
            losses.setdefault(e, []).append(v)
        self.loss = [(e + 1, sum(v) / len(v)) for e, v in sorted(losses.items())]
        self.health = {name: [(e + 1, v) for e, v in values(rows, name)] for name in (*HEALTH, GAP)}

    def _collect_health(self, trainer, done: int) -> None:
        """The values iteration ``done`` logged at its end (``done`` iterations are complete)."""
        for name in HEALTH:
            value, points = trainer.callback_metrics.get(name), self.health[name]
            if value is not None and done > 0 and (not points or points[-1][0] < done):
                points.append((done, float(value)))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._collect_health(trainer, trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the logged micro-batch mean, as metrics.csv holds it for the iterations before a resume: what training_step
        # returns is scaled for the step's gradient (by the accumulation and the step's row count), not a loss value
        loss = trainer.callback_metrics.get("train/loss")
        if outputs is not None and loss is not None and not batch.filler:
            self._losses.append(float(loss))

    def _close_epoch(self, trainer) -> None:
        """Record this iteration's reward and mean loss once: validation runs before on_train_epoch_end, and the
        picture drawn after it should already show them (the datamodule holds the rollout's metrics)."""
        done = trainer.current_epoch + 1
        if self.reward and self.reward[-1][0] == done or trainer.sanity_checking:
            return
        metrics = getattr(trainer.datamodule, "rollout_metrics", {}) or {}
        if "rollout/reward_mean" in metrics:
            self.reward.append((done, metrics["rollout/reward_mean"]))
        if GAP in metrics:
            self.health[GAP].append((done, metrics[GAP]))
        if self._losses:
            self.loss.append((done, sum(self._losses) / len(self._losses)))
        self._losses = []

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._close_epoch(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close_epoch(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._collect_health(trainer, trainer.current_epoch)
        self.draw(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        """A stopped run (a signal, the log-prob gap guard, an error) keeps a picture of everything it logged."""
        if self.accuracy:
            self.draw(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/accuracy" not in trainer.callback_metrics:
            return
        if not self.accuracy and getattr(pl_module, "initial_val_accuracy", None) is not None:
            self.accuracy.append((0, pl_module.initial_val_accuracy))
        self.accuracy.append((trainer.current_epoch + 1, float(trainer.callback_metrics["val/accuracy"])))
        if time.monotonic() - self._drawn_at >= self.every_s:
            self.draw(trainer)

    @rank_zero_only
    def draw(self, trainer) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        h = self.health
        panels = [
            ("val/accuracy", {"": self.accuracy}),
            ("rollout/reward_mean", {"": self.reward}),
            ("train/loss", {"": self.loss}),
            ("train/entropy (nats/token)", {"": h["train/entropy"]}),
            ("KL (k3, nats/token)", {"to π_t": h["train/kl_pi_t"], "to π_0": h["train/kl_initial"]}),
            ("rollout/logprob_gap_mean", {"": h[GAP]}),
        ]
        fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
        # fixed margins that fit these titles and labels: tight_layout measured every text (a third of a drawing)
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.08, top=0.95, wspace=0.22, hspace=0.35)
        for ax, (title, curves) in zip(axes.flat, panels, strict=True):
            for label, points in curves.items():
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label or None)
            if len(curves) > 1 and any(curves.values()):
                ax.legend(fontsize="small")
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self._drawn_at = time.monotonic()
        if self._logged_step == trainer.global_step:  # the end of fit redraws the last iteration's picture
            return
        self._logged_step = trainer.global_step
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="curves", images=[str(path)], step=trainer.global_step)
