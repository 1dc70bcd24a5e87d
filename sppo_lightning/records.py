"""The shared records of one self-play iteration: the ground floor every other part imports.

Data flows one way through them: a ``PromptRecord`` is drawn, an engine samples responses with ``SamplingParams``,
the ``Rollout`` collects them and the oracle's rewards and win-rates. This module imports only torch, so the data
layer, the engines, the oracles and the module can all use it without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PromptRecord:
    """One prompt: chat messages plus what the oracle checks the responses against."""

    messages: list[dict[str, str]]
    """Chat messages, the last one the user's turn."""
    ground_truth: str
    data_source: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)


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
