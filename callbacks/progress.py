"""A progress bar for the long phases Lightning does not see: generating the rollout and scoring it.

Drawn as a rich task, in Lightning's own rich progress display when it is live (so the two never fight over the
terminal), standalone otherwise; the description carries the tokens generated per second.
"""

from __future__ import annotations

import time

import lightning as L


class RolloutProgress(L.Callback):
    def __init__(self) -> None:
        self._progress = None  # a rich Progress: Lightning's, or our own while Lightning's is not live
        self._own = False
        self._task = None
        self._start = 0.0
        self._finished = None  # (progress, task) of the rollout that just ended, shown until the next stage
        self.last_line = ""  # what the last finished stage's line ended as

    def _bar(self, trainer):
        bar = trainer.progress_bar_callback
        progress = getattr(bar, "progress", None)
        if progress is not None and getattr(progress, "live", None) is not None and progress.live.is_started:
            return progress, False
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        own = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        own.start()
        return own, True

    def on_rollout_progress(self, trainer, stage: str, done: int, total: int, tokens: int) -> None:
        if not trainer.is_global_zero or trainer.progress_bar_callback is None:
            return
        if done == 0 and stage == "rollout" and self._finished is not None:  # the last rollout's line, kept till now
            self._finished[0].remove_task(self._finished[1])
            self._finished = None
        if done == 0 and self._task is None:
            self._progress, self._own = self._bar(trainer)
            self._start = time.perf_counter()
            self._task = self._progress.add_task(f"{stage} (epoch {trainer.current_epoch})", total=total)
            return
        if self._task is None:
            return
        speed = tokens / max(time.perf_counter() - self._start, 1e-9)
        suffix = f" · {speed:,.0f} tok/s" if tokens else ""
        self._progress.update(
            self._task, completed=done, description=f"{stage} (epoch {trainer.current_epoch}){suffix}"
        )
        if done >= total:
            self.last_line = f"{stage} (epoch {trainer.current_epoch}){suffix}"
            if self._own:
                self._progress.stop()  # a standalone bar stays printed, with its final tok/s
            elif stage == "rollout":  # keep the finished line (and its tok/s) in view until the next rollout
                self._finished = (self._progress, self._task)
            else:
                self._progress.remove_task(self._task)
            self._task, self._progress = None, None
