"""Engines for tests that run the real CLI (importable as ``tests.engines.X`` from a config)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sppo_lightning.rollout.hf import HFEngine


@dataclass
class SlowValidation(HFEngine):
    """The HF engine, made ``seconds`` slower on each greedy call (validation's); rollouts run at full speed."""

    seconds: float = 0.0

    def generate(self, policy, prompt_ids, params, seed):
        if params.greedy:
            time.sleep(self.seconds)
        return super().generate(policy, prompt_ids, params, seed)
