"""Each iteration's rollout as readable samples: prompts, their K responses, rewards and win-rates.

Appended to ``<default_root_dir>/samples.jsonl`` (one line per prompt, with the run and the epoch) and, when a wandb
logger is configured, logged as a ``wandb.Table`` too.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class RolloutSamples(L.Callback):
    def __init__(self, num_prompts: int = 8, filename: str = "samples.jsonl"):
        """
        Args:
            num_prompts: Prompts per iteration to record (the first ones of this rank's rollout).
            filename: File under ``trainer.default_root_dir``.
        """
        self.num_prompts, self.filename = num_prompts, filename

    @staticmethod
    def run_name(trainer) -> str:
        """Which run wrote a row: the first logger's folder under ``default_root_dir`` (``logs/version_3``), so rows
        of several runs in one folder (a resume writes a new version too) can be told apart and matched to their
        ``metrics.csv``."""
        logger = trainer.logger
        if logger is None:
            return ""
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return f"{logger.name}/{version}" if logger.name else version

    @staticmethod
    def rows(rollout, epoch: int, num_prompts: int, run: str = "") -> list[dict]:
        return [
            {
                "run": run,
                "epoch": epoch,
                "prompt": rec.messages[-1]["content"],
                "ground_truth": rec.ground_truth,
                "responses": [
                    {"text": text, "reward": float(rollout.rewards[p, k]), "win_rate": float(rollout.win_rates[p, k])}
                    for k, text in enumerate(rollout.response_text[p])
                ],
            }
            for p, rec in enumerate(rollout.prompts[:num_prompts])
        ]

    @rank_zero_only
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        rollout = getattr(trainer.datamodule, "rollout", None)
        if rollout is None or rollout.rewards is None:
            return
        rows = self.rows(rollout, trainer.current_epoch, self.num_prompts, self.run_name(trainer))
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_table(
                    key="rollout/samples",
                    columns=["epoch", "prompt", "ground_truth", "k", "response", "reward", "win_rate"],
                    data=[
                        [r["epoch"], r["prompt"], r["ground_truth"], k, s["text"], s["reward"], s["win_rate"]]
                        for r in rows
                        for k, s in enumerate(r["responses"])
                    ],
                    step=trainer.global_step,
                )
