"""Is the run able to learn? The numbers RL users read every iteration, as pure functions, and the guard on the one
that says whether the sampler runs the policy at all.

- ``rollout/logprob_gap_mean`` / ``_max``: per token |log π_sampler(y_t) − log π_trainer(y_t)| over the rollout's
  tokens: the log-probs the engine reported for the tokens it drew against the π_t log-probs the trainer computed for
  the same tokens. Float rounding (bf16 sampler against an fp32/bf16 trainer: about 0.01 to 0.06 nats on average,
  vime#64, verl-omni#637) when the engine holds the policy; of the order of a nat when it holds other weights (TRL
  #5312: 0.81 mean, 7.4 max for an engine whose weights were never re-synced after sleep mode).
- ``train/entropy``: mean per-token entropy of π_θ on the rollout's responses, from the training forward's logits.
- ``train/kl_pi_t``: k3 estimate (Schulman, "Approximating KL divergence"; verl's ``low_var_kl``) of the divergence
  between π_θ after the iteration's steps and π_t, on the iteration's last micro-batch re-scored by one no-grad
  forward.
- ``train/kl_initial``: the same estimate against the starting policy π_0, on a fixed probe: the first micro-batch of
  the first iteration and its π_0 log-probs, one no-grad forward per iteration.
- ``rollout/truncated_share``: responses that reached ``max_response_length`` without a stop token.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from sppo_lightning.errors import UserInputError

GAP_WARN = 0.1
"""Default warning threshold on the mean gap, in nats: above the bf16 noise floor reported by RL stacks (0.011 mean
|Δ log p| for Qwen3-4B under SGLang and vLLM, vime#64; 0.064 for an HF/FSDP2 trainer against vLLM, verl-omni#637), well
below a sampler that holds other weights (0.81, TRL#5312)."""
GAP_STOP = 0.5
"""Default stop threshold on the mean gap, in nats: no bf16/fp32 mismatch reported reaches it (at most ~0.06), while
an engine sampling from weights that are not the policy's does (0.81 in TRL#5312; several nats with noise weights)."""

GAP_CAUSES = (
    "the weights were not pushed to the engine after an optimizer step or a memory release, or were pushed under "
    "names it does not know (SGLang skips those silently); a server that holds other weights than the policy "
    "(started from another model, or loaded something else since); sampling settings that differ between the engine "
    "and the trainer (a server without SGLANG_RETURN_ORIGINAL_LOGPROB=1 while data.temperature != 1 reports tempered "
    "log-probs), or a sampler dtype far from the policy's"
)


class LogprobGapError(UserInputError):
    """The sampler's log-probs are so far from the trainer's that its samples are not the policy's: training on them
    learns nothing (see ``GAP_CAUSES``)."""


# ------------------------------------------------------------------------------------------- pure functions
def valid_columns(lengths: torch.Tensor, like: torch.Tensor | int) -> torch.Tensor:
    """``[B, R]`` mask of the response-aligned columns that hold a token (column j < the row's length), R the width
    of ``like`` (a ``[B, R]`` tensor) or ``like`` itself."""
    width = like if isinstance(like, int) else like.shape[1]
    return torch.arange(width, device=lengths.device)[None, :] < lengths.long()[:, None]


def gap_sums(sampler: torch.Tensor, trainer: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[3]``: (Σ |sampler − trainer|, token count, max |sampler − trainer|) over the ``valid`` tokens of ``[B, R]``
    response-aligned log-probs; the sums add over micro-batches and ranks, the max is taken."""
    diff = (sampler.float() - trainer.float()).abs() * valid
    return torch.stack([diff.sum(), valid.float().sum(), diff.max() if diff.numel() else diff.new_zeros(())])


def combine_gap(parts: torch.Tensor) -> tuple[float, float]:
    """(mean, max) gap from ``[N, 3]`` rows of ``gap_sums`` (micro-batches, ranks)."""
    parts = parts.reshape(-1, 3)
    count = float(parts[:, 1].sum())
    return (float(parts[:, 0].sum()) / count if count else 0.0), float(parts[:, 2].max()) if len(parts) else 0.0


def entropy_sums(logits: torch.Tensor, mask: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``[2]``: (Σ entropy, token count) of the softmax of ``logits [..., V]`` over the positions ``mask [...]`` marks.

    H = logsumexp(z) − Σ_v softmax(z)_v z_v, in float32, without gradient, ``chunk`` positions at a time so that the
    extra memory is ``chunk × V`` floats whatever the batch."""
    with torch.no_grad():
        flat, keep = logits.reshape(-1, logits.shape[-1]), mask.reshape(-1).float()
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, len(flat), chunk):
            z = flat[start : start + chunk].float()
            lse = z.logsumexp(-1)
            h = lse - (torch.softmax(z, -1) * z).sum(-1)
            total += (h * keep[start : start + chunk]).sum()
        return torch.stack([total, keep.sum()])


def k3_sums(logps: torch.Tensor, ref_logps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[2]``: (Σ k3, token count) of the per-token k3 estimator, r − 1 − log r with r = π/π_ref (Schulman's
    "Approximating KL divergence"; verl's ``low_var_kl``): nonnegative per token, and over tokens drawn from π_ref its
    mean is KL(π_ref‖π), which matches KL(π‖π_ref) to second order for nearby policies. The log-ratio is clamped to
    ±20 as verl does, so one token cannot overflow the mean."""
    log_r = (logps.float() - ref_logps.float()).clamp(-20, 20)
    k3 = (log_r.exp() - 1 - log_r) * valid
    return torch.stack([k3.sum(), valid.float().sum()])


def truncated_share(response_ids: list[list[list[int]]], max_length: int, stop_ids: set[int]) -> float:
    """Share of the ``[P][K]`` responses cut at ``max_length`` tokens without a stop token (verl's
    ``response_length/clip_ratio``)."""
    flat = [r for group in response_ids for r in group]
    cut = sum(len(r) >= max_length and (not r or r[-1] not in stop_ids) for r in flat)
    return cut / len(flat) if flat else 0.0


def logprob_rows(per_row: list[list[float]], width: int) -> torch.Tensor:
    """``[B, width]`` response-aligned, zero-padded tensor from per-row lists of token log-probs."""
    out = torch.zeros((len(per_row), width), dtype=torch.float32)
    for i, row in enumerate(per_row):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out


# ------------------------------------------------------------------------------------------------- the guard
class GapGuard:
    """Warns once per iteration above ``warn``, stops the run above ``stop`` (both on the mean gap, in nats)."""

    def __init__(self, warn: float = GAP_WARN, stop: float = GAP_STOP):
        self.warn, self.stop = warn, stop

    def check(self, mean: float, largest: float, when: str, engine: str) -> None:
        """Raise ``LogprobGapError`` (one line) above ``stop``; warn once above ``warn``; nothing below. ``when``
        names the pass ("iteration 3", "iteration 3's validation")."""
        where = f"{when}: the {engine} sampler's log-probs differ from the trainer's by {mean:.3g} nats"
        if self.stop and mean > self.stop:
            raise LogprobGapError(
                f"{where} per token on average (max {largest:.3g}) > data.logprob_gap_stop={self.stop}: the engine "
                f"does not sample from the policy, so training would learn nothing. Likely causes: {GAP_CAUSES}. "
                "The last checkpoint is untouched; fix the engine and resume with --ckpt_path"
            )
        if self.warn and mean > self.warn:
            warnings.warn(
                f"{where} per token on average (max {largest:.3g}) > data.logprob_gap_warn={self.warn}. "
                f"Likely causes: {GAP_CAUSES}",
                stacklevel=2,
            )


# ------------------------------------------------------------------------------------------- per iteration
PROBE_KEY = "sppo_kl_initial_probe"
"""Where a checkpoint keeps ``train/kl_initial``'s probe (its tokens and π_0 log-probs), so a resumed run measures
against the same starting policy."""


class IterationHealth:
    """What the training step gathers for ``train/entropy``, ``train/kl_pi_t`` and ``train/kl_initial``.

    Entropy: every real micro-batch of the iteration, from the training forward's logits. KL to π_t after the
    iteration's steps: the iteration's last micro-batch (its π_t log-probs travel with it) scored again by one no-grad
    forward at the iteration's end: the training log-probs of the last pass were computed before the steps that
    followed them (with one step per iteration, before any), and a pass over the whole rollout would cost as much as
    the π_t pass. KL to π_0: ``probe``, the first micro-batch of the first iteration with its π_0 log-probs (kept in
    checkpoints), scored by the same kind of forward.
    """

    FIELDS = ("input_ids", "attention_mask", "response_mask", "prompt_lengths", "ref_logps")

    def __init__(self, kl: bool = True) -> None:
        self.kl = kl  # False: no KL forwards (``model.kl_metrics``); the probe is still kept and checkpointed
        self.entropy: torch.Tensor | None = None  # (Σ, count), kept on the device: no sync per micro-batch
        self.last: dict[str, torch.Tensor] | None = None
        self.probe: dict[str, torch.Tensor] | None = None

    def start_iteration(self) -> None:
        self.entropy = self.last = None

    def observe(self, batch, entropy: torch.Tensor | None) -> None:
        """A micro-batch was trained on (a filler too: its rows are real samples with their π_t log-probs, and every
        rank must re-score one); ``entropy``: the sums its forward collected, None for a filler."""
        self.last = {f: getattr(batch, f).detach() for f in self.FIELDS}
        if entropy is not None:
            self.entropy = entropy if self.entropy is None else self.entropy + entropy

    def keep_probe(self, batch) -> None:
        """Remember ``batch`` (with its π_0 log-probs) as the probe for ``train/kl_initial``, once."""
        if self.probe is None and batch.ref_logps is not None:
            self.probe = {f: getattr(batch, f).detach().cpu().clone() for f in self.FIELDS}

    def save(self, checkpoint: dict) -> None:
        if self.probe is not None:
            checkpoint[PROBE_KEY] = self.probe

    def load(self, checkpoint: dict) -> None:
        self.probe = checkpoint.get(PROBE_KEY)

    def _kl_sets(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        sets = (("train/kl_pi_t", self.last), ("train/kl_initial", self.probe)) if self.kl else ()
        return [(name, rows) for name, rows in sets if rows]

    def to_score(self) -> list[dict[str, torch.Tensor]]:
        """The rows to run π_θ over at the iteration's end: the last micro-batch, then the probe (those held)."""
        return [rows for _, rows in self._kl_sets()]

    def metrics(
        self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor], scored: list[torch.Tensor]
    ) -> dict[str, float]:
        """The iteration's values, summed over ranks (every rank calls this); ``scored``: π_θ's log-probs now of
        each of ``to_score()``'s row sets, in that order."""
        names, sums = ["train/entropy"], [torch.zeros(2) if self.entropy is None else self.entropy.float().cpu()]
        for (name, rows), logps in zip(self._kl_sets(), scored, strict=True):
            valid = valid_columns(rows["response_mask"].sum(1).cpu(), logps)
            names.append(name)
            sums.append(k3_sums(logps.float().cpu(), rows["ref_logps"].float().cpu(), valid))
        totals = sum_over_ranks(torch.cat(sums)).cpu().view(-1, 2)
        return {name: float(total / count) for name, (total, count) in zip(names, totals, strict=True) if count > 0}
