"""Validation accuracy as MATH reports it: overall, by level and by subject, and pass@k / mean@k when sampling.

A prompt answered with k samples contributes the mean of its k scores to accuracy (mean@k; plain accuracy when
k = 1, the greedy default) and 1 to pass@k when any sample is correct. Groups come from the prompt's
``extra_info`` (``level``, ``subject``) as ``prepare_math`` writes them; prompts without them count overall only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from sppo_lightning.data.prompts import PromptRecord


def group_keys(record: PromptRecord) -> list[str]:
    """The breakdown groups a prompt belongs to, e.g. ``["level_3", "subject/intermediate_algebra"]``."""
    keys = []
    level = record.extra_info.get("level")
    if level is not None and (m := re.search(r"\d+", str(level))):  # MATH writes "Level 3"; some copies 3
        keys.append(f"level_{int(m.group())}")
    subject = record.extra_info.get("subject") or record.extra_info.get("type")
    if subject:
        keys.append("subject/" + re.sub(r"[^a-z0-9]+", "_", str(subject).lower()).strip("_"))
    return keys


class GroupedAccuracy(Metric):
    """Accuracy overall and per group, plus pass@k, summed over ranks like any torchmetrics metric.

    ``keys`` must be the same list on every rank (all groups of the whole validation set) so the states line up.
    """

    full_state_update = False

    def __init__(self, keys: Sequence[str]):
        super().__init__()
        self.keys = sorted(set(keys))
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.add_state("score_sum", torch.zeros(len(self.keys) + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", torch.zeros(len(self.keys) + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("passed", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, scores: torch.Tensor, records: Sequence[PromptRecord]) -> None:
        """``scores``: ``[P, k]`` values in [0, 1], one row per prompt in ``records``."""
        per_prompt = scores.double().mean(dim=1).tolist()
        for value, rec in zip(per_prompt, records, strict=True):
            for slot in (len(self.keys), *(self._index[k] for k in group_keys(rec) if k in self._index)):
                self.score_sum[slot] += value
                self.prompts[slot] += 1
        self.passed += (scores > 0.5).any(dim=1).sum()
        self.samples = torch.maximum(self.samples, torch.tensor(float(scores.shape[1]), dtype=torch.float64))

    def compute(self) -> dict[str, float]:
        """``{"accuracy": …, "pass@k": …, "accuracy/level_1": …, "accuracy/subject/algebra": …}`` (pass@k if k > 1)."""
        total = float(self.prompts[-1])
        if total == 0:
            return {}
        out = {"accuracy": float(self.score_sum[-1]) / total}
        k = int(self.samples)
        if k > 1:
            out[f"pass@{k}"] = float(self.passed) / total
        for key, i in self._index.items():
            if self.prompts[i] > 0:
                out[f"accuracy/{key}"] = float(self.score_sum[i] / self.prompts[i])
        return out
