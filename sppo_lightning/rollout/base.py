"""What an engine is asked for and what it gives back.

Engines take token ids and return token ids: the text is decoded once, for the oracle, and the ids that were
sampled are the ids that are trained on (re-tokenizing a decoded response can silently change it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from sppo_lightning.records import Rollout, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "SamplingParams", "truncate_at_stop"]


class RolloutEngine(ABC):
    """Turns prompts into K responses each, from the current policy.

    ``generate`` is called once per iteration, at the start of the epoch, with the module whose policy is π_t:
    an engine that keeps its own copy of the weights (SGLang) refreshes it there.
    """

    on_progress: Callable[[int, int], None] | None = None
    """Set by the pipeline: an engine that works in chunks calls it with (sequences done, tokens generated)."""

    @abstractmethod
    def generate(self, module, prompt_ids: list[list[int]], params: SamplingParams, seed: int) -> list[list[list[int]]]:
        """Return ``[P][K]`` response token ids for ``prompt_ids`` ([P] lists of ids), sampled with ``seed``."""

    def generate_with_logprobs(
        self, module, prompt_ids: list[list[int]], params: SamplingParams, seed: int
    ) -> tuple[list[list[list[int]]], list[list[list[float]]] | None]:
        """``generate`` plus ``[P][K][T]`` log π_t(y_t | x, y_<t) of each response token when the engine has them at
        no extra cost and with the policy's own numerics; None makes the pipeline compute them with a forward pass."""
        return self.generate(module, prompt_ids, params, seed), None

    def after_rollout(self, module) -> None:  # noqa: B027 - optional hook
        """Called once the rollout is done, before training: release memory held for generation."""


def truncate_at_stop(ids: list[int], stop_ids: set[int], pad_id: int | None) -> list[int]:
    """Cut generated ids after the first stop token (kept: the policy learns to stop) and drop padding."""
    out = []
    for tok in ids:
        if tok in stop_ids:
            out.append(tok)
            break
        if tok == pad_id:
            break
        out.append(tok)
    return out
