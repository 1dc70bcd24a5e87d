"""The rollout progress bar: driven by the pipeline's stages, inside Lightning's rich display, closed after each."""

import lightning as L
import pytest

from callbacks.progress import RolloutProgress
from sppo_lightning.module import SPPOModule
from tests.test_module import fit_one_iteration


class Recording(RolloutProgress):
    def __init__(self):
        super().__init__()
        self.events = []

    def on_rollout_progress(self, trainer, stage, done, total, tokens):
        super().on_rollout_progress(trainer, stage, done, total, tokens)
        if stage == "rollout" and done == total:
            self.rollout_line = self.last_line
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
    # the finished rollout's line stays in view (printed, or kept in Lightning's display), with its speed
    assert progress.last_line.startswith("scoring (epoch 0)")
    assert any(e[0] == "rollout" and e[1] == e[2] for e in progress.events)
    assert progress.rollout_line.startswith("rollout (epoch 0) · ") and progress.rollout_line.endswith(" tok/s")


def test_a_resume_reads_the_earlier_parts_of_its_own_run_only(tmp_path):
    """version_0: another run; version_1: a run stopped after iteration 1; version_2: its resume, stopped after
    iteration 2; now resuming at iteration 3. The history is version_1's start and version_2's iterations."""
    from types import SimpleNamespace

    from callbacks.history import earlier_rows, values
    from sppo_lightning.loggers import CSVLogger

    def write(version, rows):
        folder = tmp_path / "logs" / f"version_{version}"
        folder.mkdir(parents=True)
        lines = ["epoch,step,val/accuracy,time/train"] + [f"{e},{s},{a},{t}" for e, s, a, t in rows]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")

    write(0, [(-1, 0, 0.9, ""), (0, 4, 0.95, 1.0)])
    write(1, [(-1, 0, 0.3, ""), (0, 4, 0.4, 1.0), (1, 8, 0.5, 1.0), (2, 10, "", "")])  # 2: cut short
    write(2, [(2, 12, 0.6, 1.0)])
    (tmp_path / "logs" / "version_3").mkdir()
    logger = CSVLogger(save_dir=str(tmp_path), name="logs", version=3)
    trainer = SimpleNamespace(ckpt_path="last.ckpt", loggers=[logger], current_epoch=3)
    rows = earlier_rows(trainer)
    assert values(rows, "val/accuracy") == [(-1, 0.3), (0, 0.4), (1, 0.5), (2, 0.6)]
    assert len(values(rows, "time/train")) == 3
    assert earlier_rows(SimpleNamespace(ckpt_path=None, loggers=[logger], current_epoch=3)) == []


@pytest.mark.slow
def test_wandb_gets_the_curves_image_once_per_iteration(tmp_path):
    """3 iterations, 3 `curves` images in wandb's offline record: one per validation (with `every_s: 0`; the demo's
    default draws at most every 30 s), none more at the end of fit (which redraws the last one into curves.png)."""
    import os
    import time

    import yaml

    from tests.test_cli import DEMO, REPO, SHORT, run
    from tests.wandb_record import history_keys, records

    overlay = yaml.safe_load((REPO / "configs" / "wandb.yaml").read_text())
    overlay["trainer"]["logger"][1]["init_args"]["offline"] = True
    overlay["trainer"]["callbacks"] = [{"class_path": "callbacks.LearningCurves", "init_args": {"every_s": 0}}]
    (tmp_path / "wandb_offline.yaml").write_text(yaml.safe_dump(overlay))
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    run("fit", "--config", DEMO, "--config", str(tmp_path / "wandb_offline.yaml"), *SHORT, "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", env=env)  # fmt: skip
    [record] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60  # wandb's service may still be writing the record when fit returns
    while not any(r.WhichOneof("record_type") == "exit" for r in records(record)) and time.monotonic() < deadline:
        time.sleep(1)
    rows = history_keys(record)
    assert sum("val/accuracy" in row for row in rows) == 3 + 1  # the record is whole: before any update, then 3
    assert sum("curves" in row for row in rows) == 3
