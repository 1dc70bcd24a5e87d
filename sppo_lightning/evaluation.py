"""Validation accuracy as MATH reports it (overall, by level and by subject, pass@k / mean@k when sampling), and the
win rate against a reference set of responses as AlpacaEval reports it.

A prompt answered with k samples contributes the mean of its k scores to accuracy (mean@k; plain accuracy when
k = 1, the greedy default) and 1 to pass@k when any sample is correct. Groups come from the prompt's
``extra_info`` (``level``, ``subject``) as ``prepare_math`` writes them; prompts without them count overall only.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.lc_win_rate import length_controlled_win_rate
from sppo_lightning.records import PromptRecord, Rollout, SamplingParams, ValBatch
from sppo_lightning.rewards.base import RuleOracle, rule_scores


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


# --------------------------------------------------------------------------------------------------- win rate
# What AlpacaEval measures: the judge's preference of the policy's response over a fixed reference response to the
# same prompt, here the starting policy's (generated once, at the start of fit). Judges tend to prefer longer
# answers, so the lengths of both are reported beside it.


def preference_over_reference(
    oracle, records: Sequence[PromptRecord], responses: list[list[str]], reference: list[list[str]], device=None
) -> torch.Tensor:
    """``[P, n]``: the oracle's probability that the i-th response to prompt p beats the i-th reference response.

    Each (response, reference) pair is scored as a group of two by ``oracle.score``, so any oracle works: a pairwise
    judge asks both orders and symmetrises (two identical texts give exactly ½), a reward model gives σ(s − s_ref),
    a rule 1, ½ or 0. The probability is read back from the group's win-rates, P̂ = (½ + p) / 2 when the oracle
    counts each response against itself (``include_self``), P̂ = p otherwise.
    """

    pairs = [(p, i) for p, group in enumerate(responses) for i in range(len(group))]
    if not pairs:
        return torch.zeros(len(responses), 0)
    rollout = Rollout(
        prompts=[records[p] for p, _ in pairs],
        prompt_ids=[[] for _ in pairs],
        response_ids=[[[], []] for _ in pairs],
        response_text=[[responses[p][i], reference[p][i]] for p, i in pairs],
    )
    first = oracle.score(rollout, device=device).win_rates[:, 0].double()
    probs = 2 * first - 0.5 if getattr(oracle, "include_self", True) else first
    return probs.clamp(0, 1).float().view(len(responses), -1)


class WinRate(Metric):
    """Mean preference over the reference, its length-controlled version (``lc_win_rate``, AlpacaEval 2's), mean
    response length and mean reference length, gathered over ranks."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("preference", "length", "reference_length", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        # every pair's preference and length difference: the length-controlled fit needs them all, not their sums
        self.add_state("pairs", default=[], dist_reduce_fx="cat")

    def update(self, preference: torch.Tensor, lengths: torch.Tensor, reference_lengths: torch.Tensor) -> None:
        """Three tensors of the same shape, one value per (response, reference) pair."""
        self.preference += preference.double().sum()
        self.length += lengths.double().sum()
        self.reference_length += reference_lengths.double().sum()
        self.count += preference.numel()
        pairs = torch.stack([preference.double().flatten(), (lengths - reference_lengths).double().flatten()], 1)
        self.pairs.append(pairs)  # (n, 2): preference, length difference

    def compute(self) -> dict[str, float]:
        """``{"win_rate": …, "win_rate_lc": …, "response_length": …, "reference_length": …}`` (lengths in tokens);
        empty if no pair."""
        n = float(self.count)
        if n == 0:
            return {}
        pairs = dim_zero_cat(self.pairs)  # (N, 2)
        return {
            "win_rate": float(self.preference) / n,
            "win_rate_lc": length_controlled_win_rate(pairs[:, 0], pairs[:, 1]),
            "response_length": float(self.length) / n,
            "reference_length": float(self.reference_length) / n,
        }


def reference_key(record: PromptRecord) -> str:
    """A validation prompt's key in the reference file: its messages as JSON (the same on every rank and resume)."""
    return json.dumps(record.messages, sort_keys=True, ensure_ascii=False)


class ReferenceResponses:
    """The fixed responses the win rate is measured against, by prompt: texts and lengths in tokens.

    Saved as ``path`` (jsonl, one line per prompt: ``{"prompt": messages, "responses": [...], "lengths": [...]}``).
    """

    def __init__(self, path: Path, entries: dict[str, dict] | None = None):
        self.path, self.entries = Path(path), entries if entries is not None else {}

    def add(self, records: Sequence[PromptRecord], responses: list[list[list[int]]], texts: list[list[str]]) -> None:
        for rec, ids, group in zip(records, responses, texts, strict=True):
            self.entries[reference_key(rec)] = {"responses": list(group), "lengths": [len(r) for r in ids]}

    def lookup(self, records: Sequence[PromptRecord], n: int) -> tuple[list[list[str]], torch.Tensor]:
        """The first ``n`` reference responses of each prompt and their lengths ``[P, n]``."""

        refs = []
        for rec in records:
            entry = self.entries.get(reference_key(rec))
            if entry is None or len(entry["responses"]) < n:
                raise DataError(
                    f"{self.path}: no {n} reference response(s) for the validation prompt {reference_key(rec)}"
                )
            refs.append(entry)
        lengths = torch.tensor([e["lengths"][:n] for e in refs], dtype=torch.float64)
        return [e["responses"][:n] for e in refs], lengths

    def save(self) -> None:
        """Written atomically (a crash mid-write leaves no half file to resume against)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w") as f:
            for key, entry in self.entries.items():
                f.write(json.dumps({"prompt": json.loads(key), **entry}, ensure_ascii=False) + "\n")
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> ReferenceResponses:
        entries = {}
        with Path(path).open() as f:
            for line in f:
                row = json.loads(line)
                entries[json.dumps(row.pop("prompt"), sort_keys=True, ensure_ascii=False)] = row
        return cls(path, entries)


def update_win_rate(
    metric: WinRate, oracle, reference: ReferenceResponses, records, responses: list[list[list[int]]], texts, device
) -> None:
    """Add a validation batch (``responses`` ids and their ``texts``, ``[P][n]``) to ``metric``: the oracle's
    preference of each over the reference response to the same prompt, and both lengths."""
    if not records:  # a batch of padding rows only (a rank's short share, see the datamodule's val_dataloader)
        return
    n = min(len(group) for group in texts)
    ref_texts, ref_lengths = reference.lookup(records, n)
    preference = preference_over_reference(oracle, records, [g[:n] for g in texts], ref_texts, device)
    lengths = torch.tensor([[len(r) for r in group[:n]] for group in responses], dtype=torch.float64)
    metric.update(preference.to(metric.device), lengths.to(metric.device), ref_lengths.to(metric.device))


# ------------------------------------------------------------------------------------------------- validation
class ValidationSource(Protocol):
    """What validation reads from the data side (``RolloutDataModule``, ``trainer.datamodule``), and nothing else.

    Validation samples through the rollout's engine (SGLang on GPU) and judges the win rate with the rollout's
    oracle, so both are the datamodule's; the accuracy's groups are those of its whole validation set, the same on
    every rank; and the first evaluation, before Lightning's loop ever runs, reads the standard ``val_dataloader()``.
    A val batch is a ``records.ValBatch`` (rows of ``prompt_ids`` past ``records`` keep ranks in step and are not
    scored).
    """

    engine: Any
    """Generates the responses (``RolloutEngine``); None: HF generate."""
    oracle: Any
    """The training oracle (``Oracle``): judges the win rate unless ``model.val_judge`` is set, then
    ``win_rate_train_judge``; None: no training judge."""
    val_prompts: list[PromptRecord]
    """The whole validation set, identical on every rank."""

    def val_dataloader(self) -> Iterable[dict]: ...

    def check_validation_sampler(self, module, prompt_ids: list[list[int]], samples: Any, when: str) -> None:
        """The log-prob gap guard on a validation batch's ``Samples`` (with ``sampler_logprobs``), ``when`` naming
        the pass: raises ``health.LogprobGapError`` above ``data.logprob_gap_stop``."""


Generate = Callable[[list[list[int]], SamplingParams, int], list[list[list[int]]]]
"""``generate(prompt_ids, params, seed) -> [P][K]`` response ids of the policy being validated."""


def win_rate_enabled(setting: bool | None, oracle, judge=None) -> bool:
    """Whether ``val/win_rate`` is measured: ``model.val_win_rate``, or when None, whenever a validation judge
    (``model.val_judge``) is set or the training oracle is a preference oracle (pairwise judge or reward model); the
    rule oracle's verdict is already ``val/accuracy``."""
    if setting is None:
        return judge is not None or (oracle is not None and not isinstance(oracle, RuleOracle))
    if setting and oracle is None and judge is None:
        raise ConfigError("model.val_win_rate needs a judge: model.val_judge, or the datamodule's oracle (data.oracle)")
    return setting


TRAIN_JUDGE = "_train_judge"
"""Suffix of the win rates judged by the training oracle when ``model.val_judge`` is another judge."""


def judges(val_judge, oracle) -> dict[str, Any]:
    """Who judges the win rate, by the suffix of its metrics: ``model.val_judge`` (default: the training oracle)
    for ``win_rate``/``win_rate_lc``, and the training oracle for ``win_rate_train_judge``/``win_rate_lc_train_judge``
    when both are set, so that the gap between the judge trained on and a held-out one is on every plot."""
    if val_judge is None:
        return {"": oracle} if oracle is not None else {}
    out = {"": val_judge}
    if oracle is not None and oracle is not val_judge:
        out[TRAIN_JUDGE] = oracle
    return out


class Validation:
    """A run's validation scoring: accuracy (``GroupedAccuracy``), the win rate (``WinRate``) and the reference
    responses it is measured against.

    One pass is ``start`` → ``score`` for each val batch → ``finish``, whether Lightning's validation loop drives it
    or the evaluation before the first update does. The pass that is given ``reference=path`` (the first, on a
    fresh run) keeps its responses as the reference and writes them (rank 0) when it finishes; a resumed run reads
    them back (``load_reference``). Metrics are synchronised across ranks by ``finish``; nothing here is a
    submodule, so nothing enters the state dict or the FSDP wrapping.
    """

    def __init__(self, accuracy_fn: Callable[[str, str], float], tokenizer, judge=None):
        self.accuracy_fn, self.tokenizer = accuracy_fn, tokenizer
        self.judge = judge
        """``model.val_judge``: judges ``win_rate``; None: the training oracle does."""
        self.reference: ReferenceResponses | None = None
        """The starting policy's responses; None: no win rate."""
        self._accuracy: GroupedAccuracy | None = None
        self._win_rates: dict[str, tuple[Any, WinRate]] = {}  # suffix -> (judge, its metric)
        self._collecting = False
        self._device, self._seed = None, 0
        self._started = 0.0
        self.seconds = 0.0
        """How long the last pass took, ``start`` to ``finish`` (generation, scoring, the engine's release): the
        iteration's ``time/validation``. Work other callbacks do when a validation ends is not validation."""

    def load_reference(self, path: Path) -> None:
        """Resume the win rate against the reference of the run's start; without the file, no win rate (warned)."""
        if not Path(path).exists():
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"no {path} to resume the win rate against: val/win_rate is not logged in this run")
            self.reference = None
            return
        self.reference = ReferenceResponses.load(path)

    def start(self, prompts: Sequence[PromptRecord], oracle, device, seed: int, reference: Path | None = None) -> None:
        """A new pass over the validation set ``prompts`` (all of it, every rank: the accuracy's groups), sampling
        with ``seed``; the win rate is judged by ``judge`` (else the training ``oracle``; by both when both are set,
        see ``judges``) when there is a reference, or ``reference`` is given: then this pass's responses are the
        reference (written there by ``finish``)."""
        if reference is not None:
            self.reference, self._collecting = ReferenceResponses(reference), True
        self._accuracy = GroupedAccuracy([k for rec in prompts for k in group_keys(rec)]).to(device)
        self._win_rates = {}
        if self.reference is not None:
            self._win_rates = {k: (j, WinRate().to(device)) for k, j in judges(self.judge, oracle).items()}
        self._device, self._seed = device, seed
        self._started = time.perf_counter()

    def score(self, batch: ValBatch, generate: Generate) -> None:
        """Generate for a val batch and add its scored rows to the metrics (the win rate's first pass: ½ each)."""
        records, params = batch.records, batch.params
        responses = generate(batch.prompt_ids, params, self._seed)  # [P'][n] ids
        texts = [[self.tokenizer.decode(r, skip_special_tokens=True) for r in group] for group in responses]
        responses, texts = responses[: len(records)], texts[: len(records)]  # past the records: padding, not scored
        if self._collecting:
            self.reference.add(records, responses, texts)
        for judge, metric in self._win_rates.values():
            update_win_rate(metric, judge, self.reference, records, responses, texts, self._device)
        scores = rule_scores(self.accuracy_fn, texts, records).reshape(len(records), params.n)  # [P, n] in [0, 1]
        self._accuracy.update(scores, records)

    def finish(self) -> dict[str, float]:
        """The pass's results, the same on every rank (``accuracy``, ``accuracy/<group>``, ``pass@k``; ``win_rate``,
        ``win_rate_lc``, ``response_length``, ``reference_length``; ``win_rate_train_judge`` and
        ``win_rate_lc_train_judge`` with a separate validation judge), empty without a scored prompt; the reference
        written if this pass collected it."""
        results = self._accuracy.compute()
        for suffix, (_, metric) in self._win_rates.items():
            got = metric.compute()
            if suffix:  # the lengths are the same whoever judges: once, with the main judge's figures
                got = {f"{k}{suffix}": v for k, v in got.items() if k.startswith("win_rate")}
            results.update(got)
        self._accuracy, self._win_rates = None, {}
        if self._collecting:
            self._collecting = False
            self._save_reference()
        self.seconds = time.perf_counter() - self._started
        return results

    def _save_reference(self) -> None:
        """Merge every rank's share of the reference and write it (rank 0)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            shares = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shares, self.reference.entries)
            self.reference.entries = {k: v for share in shares for k, v in share.items()}
        if not distributed or torch.distributed.get_rank() == 0:
            self.reference.save()
