"""The rollout progress bar: driven by the pipeline's stages, inside Lightning's rich display, closed after each."""

import lightning as L

from callbacks.progress import RolloutProgress
from sppo_lightning.module import SPPOModule
from tests.test_module import fit_one_iteration


class Recording(RolloutProgress):
    def __init__(self):
        super().__init__()
        self.events = []

    def on_rollout_progress(self, trainer, stage, done, total, tokens):
        super().on_rollout_progress(trainer, stage, done, total, tokens)
        self.events.append((stage, done, total, tokens, self._task is not None))


def test_rollout_and_scoring_report_progress_with_tokens(toy_model_dir):
    L.seed_everything(0)
    progress = Recording()
    trainer = fit_one_iteration(SPPOModule(str(toy_model_dir)), progress, progress_bar=True)
    stages = [e[0] for e in progress.events]
    assert stages[0] == "rollout" and stages[-1] == "scoring" and set(stages) == {"rollout", "scoring"}
    rollout = [e for e in progress.events if e[0] == "rollout"]
    assert rollout[0][1:3] == (0, 64) and rollout[0][4]  # 16 prompts x K=4: a task opened at 0
    assert rollout[-1][1] == 64 and rollout[-1][3] > 0 and not rollout[-1][4]  # closed at the end, tokens counted
    assert [e[1] for e in rollout] == sorted(e[1] for e in rollout)  # only forward
    assert progress._progress is None and type(trainer.progress_bar_callback).__name__ == "RichProgressBar"
