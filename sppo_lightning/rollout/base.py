"""What an engine is asked for and what it gives back.

Engines take token ids and return token ids: the text is decoded once, for the oracle, and the ids that were
sampled are the ids that are trained on (re-tokenizing a decoded response can silently change it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sppo_lightning.data.prompts import PromptRecord


@dataclass
class SamplingParams:
    """How responses are sampled; the same fields SGLang's ``sampling_params`` take."""

    n: int = 1
    """Responses per prompt (K)."""
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after any of these (the tokenizer's EOS is always one)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One iteration's samples: P prompts × K responses drawn from π_t, and what was learned about them.

    Filled stage by stage: the engine sets the ids and text, the oracle ``rewards`` and ``win_rates``.
    """

    prompts: list[PromptRecord]
    prompt_ids: list[list[int]]
    """[P] chat-templated prompt token ids."""
    response_ids: list[list[list[int]]]
    """[P][K] sampled token ids; a response ends with EOS unless it hit ``max_new_tokens`` (truncated)."""
    response_text: list[list[str]]
    """[P][K] decoded once, special tokens removed, for the oracle."""
    response_logprobs: list[list[list[float]]] | None = None
    """[P][K][T] log π_t(y_t | x, y_<t) of each response token when the engine supplied them (else computed by a
    forward pass before training)."""
    rewards: torch.Tensor | None = None
    """[P, K] the oracle's per-response reward or score."""
    win_rates: torch.Tensor | None = None
    """[P, K] P̂(y_k ≻ π_t | x)."""

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def group_size(self) -> int:
        return len(self.response_ids[0]) if self.response_ids else 0


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
