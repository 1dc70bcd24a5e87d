"""The per-iteration record: what the rollout looked like and where the iteration's time went.

Once per iteration (one epoch), ``IterationRecord`` logs the datamodule's ``rollout_metrics`` (``rollout/*`` and the
pipeline's ``time/rollout``, ``time/scoring``, ``time/ref_logprobs``), ``time/train`` and ``time/validation``.
``SPPOModule.configure_callbacks`` installs it, so no config can forget it (Lightning puts it after the config's
callbacks, and a config's own ``IterationRecord`` is replaced by the module's, never doubled).

``time/train`` is the training loop only: from the epoch's start to its last step's end, less any validation Lightning
ran in between (``val_check_interval`` < 1). Validation is a phase of its own: Lightning runs the epoch-end validation
inside the training epoch, after its last step; ``time/validation`` is the module's validation passes
(``Validation.seconds``: generation, scoring, the engine's release), summed over the epoch's validations. The other
callbacks' work at a validation's end (drawing curves, say) is in no phase. The evaluation before the first update
is not Lightning's loop: ``log_before_training`` writes its row.
"""

from __future__ import annotations

import time

import lightning as L


class IterationRecord(L.Callback):
    """Logs each iteration's rollout metrics, the policy's health (``SPPOModule.iteration_health``), ``time/train``
    and ``time/validation`` (means over ranks)."""

    def __init__(self) -> None:
        self._epoch_start = self._last_step_end = 0.0
        self._validation: float | None = None  # seconds of validation in this epoch so far; None: none ran
        self._validation_before_last_step = 0.0  # the part of it that ran before the last step ended

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last_step_end = time.perf_counter()
        self._validation, self._validation_before_last_step = None, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_step_end = time.perf_counter()
        self._validation_before_last_step = self._validation or 0.0

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # the sanity check runs before the first epoch: no iteration's time
            self._validation = (self._validation or 0.0) + pl_module.validation.seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Runs after the epoch's validation (Lightning runs it inside the training epoch, before this hook).
        metrics = dict(getattr(trainer.datamodule, "rollout_metrics", None) or {})
        metrics["time/train"] = self._last_step_end - self._epoch_start - self._validation_before_last_step
        if self._validation is not None:
            metrics["time/validation"] = self._validation
        if hasattr(pl_module, "iteration_health"):  # train/entropy, train/kl_pi_t, train/kl_initial (health.py)
            metrics.update(pl_module.iteration_health())
        # sync_dist: each rank generated and scored its own share of the rollout; the logged value is their mean
        pl_module.log_dict(metrics, on_epoch=True, on_step=False, sync_dist=True)


def log_before_training(trainer, results: dict[str, float], seconds: float) -> None:
    """The first point of the learning curve: ``val/*`` of the policy before any update and the seconds that
    evaluation took (``time/validation``), one row at step 0 with ``epoch`` -1.

    Straight to the loggers: ``LightningModule.log`` has no place before the first epoch.
    """
    row = {**{f"val/{k}": v for k, v in results.items()}, "time/validation": seconds, "epoch": -1}
    for logger in trainer.loggers:
        logger.log_metrics(row, step=0)
