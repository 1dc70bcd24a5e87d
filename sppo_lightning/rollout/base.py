"""What an engine is asked for and what it gives back.

Engines take token ids and return token ids: the text is decoded once, for the oracle, and the ids that were
sampled are the ids that are trained on (re-tokenizing a decoded response can silently change it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sppo_lightning.records import Rollout, Samples, SamplingParams

__all__ = ["PolicyHandle", "Rollout", "RolloutEngine", "Samples", "SamplingParams", "truncate_at_stop"]


@dataclass(frozen=True)
class PolicyHandle:
    """What an engine may touch of the trainer's policy: made by ``SPPOModule.policy_handle()`` for each call.

    Everything an engine needs to generate from π_t, or to copy its weights into an engine of its own, and nothing
    else of the LightningModule or the Trainer.
    """

    policy: torch.nn.Module
    """The policy (possibly sharded); run it only through ``run``."""
    tokenizer: Any
    name_or_path: str
    """The model folder or hub id the policy was loaded from (an engine with its own copy loads its config there)."""
    trust_remote_code: bool
    step: int
    """Optimizer steps taken so far: the version of the weights (an engine re-syncs its copy when it changes)."""
    device: torch.device
    """Where the policy computes on this rank."""
    rank: int = 0
    world_size: int = 1
    output_dir: Path = Path(".")
    """The run's folder (``trainer.default_root_dir``)."""
    fsdp1: bool = False
    """Under ``FSDPStrategy`` (FSDP1), which gathers its root's weights only inside its own forward."""
    run: Callable[[Callable[[], Any]], Any] = lambda fn: fn()
    """``run(fn)``: call ``fn()``, which runs the policy outside a Lightning step, without gradients."""
    full_parameters: Callable[[], AbstractContextManager] | None = None
    """A context in which the policy's parameters can be read whole (None: they always can)."""
    full_state_dict: Callable[[], dict[str, torch.Tensor]] | None = None
    """The whole weights on CPU, complete on rank 0; a collective under FSDP (every rank calls it)."""
    barrier: Callable[[str], None] = lambda name: None
    """Wait until every rank gets here."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RolloutEngine(ABC):
    """Turns prompts into K responses each, from the current policy.

    ``generate`` is called once per iteration, at the start of the epoch, and for each validation batch, with a
    ``PolicyHandle`` on π_t: all an engine may touch of the trainer. An engine that keeps its own copy of the
    weights (SGLang) refreshes it there when ``policy.step`` has moved.
    """

    on_progress: Callable[[int, int], None] | None = None
    """Set by the pipeline: an engine that works in chunks calls it with (sequences done, tokens generated)."""
    holds_own_weights: bool = False
    """The engine samples from a copy of the weights it keeps (pushed after each step, loaded by a server) rather
    than from the live policy: validation then asks it for the sampled tokens' log-probs too, and the log-prob gap
    guard checks its first batch, so a copy that went stale (a push skipped after a memory release) stops the run at
    the first pass that samples from it, the validation before any update included."""

    @abstractmethod
    def generate(self, policy: PolicyHandle, prompt_ids: list[list[int]], params: SamplingParams, seed: int) -> Samples:
        """``[P][K]`` responses for ``prompt_ids`` ([P] lists of ids), sampled with ``seed``; their log-probs too
        (``Samples.logprobs``) when the engine has them at no extra cost and with the policy's own numerics."""

    def after_rollout(self, policy: PolicyHandle) -> None:  # noqa: B027 - optional hook
        """Called once the rollout (or a validation pass) is done, before training: release memory held for
        generation."""


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
