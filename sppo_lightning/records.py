"""The shared records of one self-play iteration: the ground floor every other part imports.

Data flows one way through them: a ``PromptRecord`` is drawn, an engine samples ``Samples`` with ``SamplingParams``,
the ``Rollout`` collects them with their text, an oracle returns ``Scores`` for it, and the pipeline lays the rows
out as ``TrainBatch``es for the step. This module imports only torch, so the data layer, the engines, the oracles
and the module can all use it without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    logprobs: bool = False
    """Ask for each response token's log π_t as well (``Samples.logprobs``), which an engine gives when it has them
    cheaply: the rollout asks, validation does not."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Samples:
    """What an engine returns for P prompts: K responses each, as token ids."""

    response_ids: list[list[list[int]]]
    """[P][K] sampled token ids; a response ends with EOS unless it hit ``max_new_tokens`` (truncated)."""
    logprobs: list[list[list[float]]] | None = None
    """[P][K][T] log π_t(y_t | x, y_<t) of each response token, when the engine has them at no extra cost and with
    the policy's own numerics; None makes the pipeline compute them with a forward pass."""
    sampler_logprobs: list[list[list[float]]] | None = None
    """[P][K][T] the log-probs the sampler itself reported for the tokens it drew (untempered: log π of the weights
    it holds). Never trained on: the pipeline compares them with the trainer's π_t (``rollout/logprob_gap``)."""


@dataclass
class Scores:
    """What an oracle returns for P prompts × K responses."""

    rewards: torch.Tensor
    """[P, K] the oracle's per-response reward or score."""
    win_rates: torch.Tensor
    """[P, K] P̂(y_k ≻ π_t | x)."""
    unscored: int = 0
    """Responses the oracle could not score (a rule that raised or gave a value outside [0, 1]): scored as losses."""
    preferences: torch.Tensor | None = None
    """[P, K, K] P(y_i ≻ y_j | x), symmetrised (P(i ≻ j) + P(j ≻ i) = 1), ½ on the diagonal: the matrix the win-rates
    are row means of, which the Nash-learning losses (``inpo``) regress on; None when an oracle gives none."""


@dataclass
class Rollout:
    """One iteration's samples: P prompts × K responses drawn from π_t, and what was learned about them.

    Built from the engine's ``Samples`` and their text; ``with_scores`` adds the oracle's ``Scores`` (a new record:
    nothing is filled in by mutation).
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
    sampler_logprobs: list[list[list[float]]] | None = None
    """[P][K][T] what the sampler reported for its tokens (``Samples.sampler_logprobs``), for the gap check."""
    rewards: torch.Tensor | None = None
    """[P, K] the oracle's per-response reward or score."""
    win_rates: torch.Tensor | None = None
    """[P, K] P̂(y_k ≻ π_t | x)."""
    unscored: int = 0
    """Responses the oracle could not score."""
    preferences: torch.Tensor | None = None
    """[P, K, K] P(y_i ≻ y_j | x) (``Scores.preferences``)."""

    def with_scores(self, scores: Scores) -> Rollout:
        return replace(
            self,
            rewards=scores.rewards,
            win_rates=scores.win_rates,
            unscored=scores.unscored,
            preferences=scores.preferences,
        )

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def group_size(self) -> int:
        return len(self.response_ids[0]) if self.response_ids else 0


@dataclass
class ValBatch:
    """One validation batch of this rank: prompts to generate for, and the records of those to score."""

    prompt_ids: list[list[int]]
    """[P'] chat-templated prompt ids; rows past ``records`` only keep ranks in step (they are not scored)."""
    records: list[PromptRecord]
    """[P <= P'] the prompts scored, the first P rows."""
    params: SamplingParams


@dataclass
class TrainBatch:
    """One training micro-batch: B rows of prompt + response, right-padded to one width, and what the loss needs.

    Rows of one prompt (a *group*) are adjacent. In a ``paired`` batch every group is two rows, winner then loser;
    ``pairs`` hands out that layout as ``[B/2, 2, ...]`` views, so no code slices rows by convention.
    """

    input_ids: torch.Tensor
    """[B, T] prompt + response token ids."""
    attention_mask: torch.Tensor
    """[B, T] 1 on real tokens."""
    response_mask: torch.Tensor
    """[B, T] 1.0 on response tokens."""
    prompt_lengths: torch.Tensor
    """[B] prompt tokens of each row."""
    group: torch.Tensor
    """[B] the prompt each row comes from (rows of a group share their prompt)."""
    targets: torch.Tensor
    """[B] what log π_θ/π_t regresses onto: η(P̂ − ½), or η(r − SoftMean_η(r)); 0 for losses without a target."""
    win_rates: torch.Tensor
    """[B] P̂(y ≻ π_t | x) of each row's response."""
    row_weight: torch.Tensor
    """[B] 1 = the row's loss term counts in its step's mean; 0 for an empty response and in a filler."""
    paired: bool = False
    """Groups are (winner, loser) pairs."""
    grouped: bool = False
    """Groups are a prompt's K responses, all of them, and the loss is one term per group (``LossSpec.grouped``)."""
    preferences: torch.Tensor | None = None
    """[B, K] P(y ≻ y_j | x) of each row's response against each response j of its group (its row of
    ``Scores.preferences``)."""
    ref_logps: torch.Tensor | None = None
    """[B, R] log π_t(y_t | x, y_<t) of each response token, response-aligned and zero-padded."""
    sampler_logps: torch.Tensor | None = None
    """[B, R] the sampler's reported log-probs of the same tokens, laid out as ``ref_logps`` (for the gap check)."""
    step_units: torch.Tensor | None = None
    """Loss terms of this micro-batch's optimizer step on all ranks (the step's gradient is their mean)."""
    filler: bool = False
    """A micro-batch that only keeps ranks and passes in step: every row weighs 0."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def rows_per_term(self) -> int:
        """Rows that make one loss term: 2 in a paired batch, K in a grouped one, else 1."""
        if self.grouped:
            if self.preferences is None:
                raise ValueError("a grouped batch carries each row's preferences, [B, K]")
            return self.preferences.shape[1]
        return 2 if self.paired else 1

    def groups(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, ...] -> [B/K, K, ...]``: each group's K responses; only for a grouped batch."""
        if not self.grouped:
            raise ValueError("groups() of a batch that is not laid out in whole groups")
        k = self.rows_per_term
        return values.reshape(len(values) // k, k, *values.shape[1:])

    def pairs(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, ...] -> [B/2, 2, ...]``: each group's (winner, loser); only for a paired batch."""
        if not self.paired:
            raise ValueError("pairs() of a batch that is not laid out in (winner, loser) pairs")
        return values.reshape(len(values) // 2, 2, *values.shape[1:])
