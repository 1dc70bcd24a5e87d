"""RolloutDataModule: every epoch, a fresh self-play iteration of preference data from the current policy.

``train_dataloader()`` runs the pipeline, one named stage each:

    draw prompts → rollout (K samples from π_t) → oracle → win-rates → examples (per loss_type)
    → micro-batches → π_t log-probs (no_grad, same micro-batches as training) → DataLoader

so the Trainer must call it again every epoch (``reload_dataloaders_every_n_epochs: 1``).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from functools import partial

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from sppo_lightning import health, sharding
from sppo_lightning.data.batching import attach_step_units, collate, filler, micro_batches, placeholder
from sppo_lightning.data.draw import draw_indices, shard
from sppo_lightning.data.examples import Example, build_groups
from sppo_lightning.data.prompts import PromptSource
from sppo_lightning.data.steps import (
    cut_into_steps,
    micro_batches_per_step,
    passes,
    resolve_rows_per_step,
    steps_per_rollout,
    top_up,
)
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.loss import LOSSES
from sppo_lightning.records import PromptRecord, Rollout, Samples, SamplingParams, Scores, TrainBatch, ValBatch
from sppo_lightning.rewards.base import Oracle, RuleOracle
from sppo_lightning.rollout.base import RolloutEngine
from sppo_lightning.rollout.hf import HFEngine


@contextmanager
def _timed(metrics: dict, name: str):
    start = time.perf_counter()
    yield
    metrics[name] = time.perf_counter() - start


# Our iterable has an exact length (a list, read in one process); Lightning's caution about workers does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class _MicroBatches(torch.utils.data.IterableDataset):
    """Batches made ahead, already this rank's share: training's micro-batches, validation's prompt batches."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:  # lets the progress bar and the scheduler know the epoch's length
        return len(self.batches)


class RolloutDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: PromptSource,
        val: PromptSource | None = None,
        engine: RolloutEngine | None = None,
        oracle: Oracle | None = None,
        prompts_per_epoch: int | None = None,
        samples_per_prompt: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        max_prompt_length: int = 512,
        max_response_length: int = 256,
        overlong_prompts: str = "filter",
        micro_batch_size: int = 8,
        rows_per_step: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        passes_per_rollout: int = 1,
        balance_tokens: bool = False,
        val_batch_size: int = 64,
        val_samples_per_prompt: int = 1,
        val_temperature: float = 0.0,
        seed: int = 0,
        logprob_gap_warn: float = health.GAP_WARN,
        logprob_gap_stop: float = health.GAP_STOP,
        loss_type: str = "sppo",
        eta: float = 1.0,
    ):
        """
        Args:
            train: Training prompts (``class_path``: ``sppo_lightning.data.PromptFiles``, a toy task, ...).
            val: Held-out prompts for ``val/accuracy``; None disables validation.
            engine: Rollout engine; default ``sppo_lightning.rollout.HFEngine``.
            oracle: What decides which responses win; default ``sppo_lightning.rewards.RuleOracle``.
            prompts_per_epoch: Prompts per iteration; None = the whole set each iteration (the paper).
            samples_per_prompt: K, responses sampled per prompt.
            temperature: Sampling temperature of the rollout.
            top_p: Nucleus sampling threshold of the rollout.
            top_k: Top-k of the rollout; -1 disables it.
            max_prompt_length: Longer prompts (in tokens, after the chat template) are filtered or refused.
            max_response_length: Maximum new tokens per response.
            overlong_prompts: ``filter`` (dropped, with a count) or ``error``.
            micro_batch_size: Rows per training micro-batch and process (a multiple of the rows each prompt
                contributes): how a step's rows are cut, verl's ``ppo_micro_batch_size_per_gpu``.
            rows_per_step: Rows (responses; 2 per pair under a paired loss type) of one optimizer step over all
                processes: verl's ``ppo_mini_batch_size`` × ``rollout.n``, TRL's ``per_device_train_batch_size`` ×
                ``gradient_accumulation_steps`` × processes. A rollout of R rows makes R // rows_per_step steps per
                pass whatever the response lengths, the token budget and the number of processes and nodes (a
                partial last step is merged into the others); ``trainer.accumulate_grad_batches`` is derived
                (the micro-batches a step needs on the busiest process) and may only be left out or agree. A multiple
                of processes × rows per prompt. None = ``micro_batch_size`` × ``trainer.accumulate_grad_batches`` ×
                processes, TRL's reading, which changes with the number of processes.
            max_tokens_per_micro_batch: Fill micro-batches with whole groups up to this many tokens (prompt +
                response of every row) instead of ``micro_batch_size`` rows (verl's ``use_dynamic_bsz``): even
                work per micro-batch whatever the lengths, and a batch of long responses cannot run out of memory.
                It cuts the rows of a step (``rows_per_step``), it does not change them. None = by rows.
            passes_per_rollout: How many times training goes over each rollout's micro-batches (TRL's
                ``num_iterations``, verl's ``ppo_epochs``), each pass in a new order. π_t and the targets stay those
                of the rollout, so later passes carry on the same regression towards η(P̂ − ½). Each pass goes over
                the same optimizer steps (the same rows each), in a new order, as verl's ``ppo_epochs``.
            balance_tokens: Pack groups by length so that the micro-batches ranks train on together carry similar
                token counts (for several processes); otherwise groups are packed in a shuffled order.
            val_batch_size: Prompts per validation batch.
            val_samples_per_prompt: Responses per validation prompt; accuracy is their mean (mean@k).
            val_temperature: 0 = greedy validation.
            seed: Seeds the prompt draw, the rollout sampling and the shuffling, per iteration.
            logprob_gap_warn: Warn (once per iteration) when the mean per-token gap between the log-probs the engine
                reported for its tokens and the trainer's π_t log-probs exceeds this many nats
                (``rollout/logprob_gap_mean``); 0 = never. The default is above the bf16-vs-fp32 noise RL stacks
                report (0.01 to 0.06).
            logprob_gap_stop: Stop the run (one line, exit 2, checkpoints untouched) above this mean gap: the engine
                does not sample from the policy (other or stale weights); 0 = never.
            loss_type: The loss type the rows are laid out for (``loss.LOSSES``): linked from ``model.loss_type`` by
                the CLI, so a config sets it once, there. Built in Python: the module's value.
            eta: η of the targets η(P̂ − ½) or η(r − SoftMean_η(r)): linked from ``model.eta``, as ``loss_type``.
        """
        super().__init__()
        # loss_type and eta are the module's settings (model.*), linked here: kept out of data's hparams so that a
        # changed value is reported once, under model, and checkpoints' data settings stay as they were
        self.save_hyperparameters(ignore=["train", "val", "engine", "oracle", "loss_type", "eta"])
        self.loss_type, self.eta = loss_type, eta
        self.train_source, self.val_source = train, val
        self.engine = engine if engine is not None else HFEngine()
        self.oracle = oracle if oracle is not None else RuleOracle()
        self.train_prompts: list[PromptRecord] = []
        self.train_prompt_ids: list[list[int]] = []
        self.val_prompts: list[PromptRecord] = []
        self.val_prompt_ids: list[list[int]] = []
        self.rollout_metrics: dict[str, float] = {}
        self.rollout: Rollout | None = None
        """The last iteration's scored rollout (for callbacks: sample tables, progress)."""
        self.rows_per_step: int | None = None
        """``rows_per_step`` resolved for the trainer's processes (``setup``)."""
        self.configured_accumulate: int | None = None
        """``trainer.accumulate_grad_batches`` as configured, before each iteration sets it to its step's size."""
        self._check_settings()

    def _check_settings(self) -> None:
        """Raise one ConfigError listing every impossible setting, the loss type's needs (its ``LOSSES`` entry)
        included."""
        h = self.hparams
        problems = []
        if h.samples_per_prompt < 1:
            problems.append(f"data.samples_per_prompt must be >= 1, got {h.samples_per_prompt}")
        if h.prompts_per_epoch is not None and h.prompts_per_epoch < 1:
            problems.append(f"data.prompts_per_epoch must be >= 1 or null, got {h.prompts_per_epoch}")
        if h.micro_batch_size < 1:
            problems.append(f"data.micro_batch_size must be >= 1, got {h.micro_batch_size}")
        if h.max_tokens_per_micro_batch is not None and h.max_tokens_per_micro_batch < 1:
            problems.append(f"data.max_tokens_per_micro_batch must be >= 1 or null, got {h.max_tokens_per_micro_batch}")
        if h.passes_per_rollout < 1:
            problems.append(f"data.passes_per_rollout must be >= 1, got {h.passes_per_rollout}")
        if h.overlong_prompts not in ("filter", "error"):
            problems.append(f"data.overlong_prompts must be 'filter' or 'error', got {h.overlong_prompts!r}")
        if h.temperature < 0 or h.val_temperature < 0:
            problems.append("data.temperature and data.val_temperature must be >= 0")
        if not 0 < h.top_p <= 1:
            problems.append(f"data.top_p must be in (0, 1], got {h.top_p}")
        if h.samples_per_prompt < self.oracle.min_samples:
            problems.append(
                f"data.oracle {type(self.oracle).__name__} compares responses with each other: "
                f"data.samples_per_prompt must be >= {self.oracle.min_samples}"
            )
        spec = LOSSES.get(self.loss_type)
        if spec is None:
            problems.append(f"model.loss_type must be one of {', '.join(LOSSES)}, got {self.loss_type!r}")
        else:
            if h.samples_per_prompt < spec.min_samples:
                problems.append(
                    f"model.loss_type={self.loss_type} needs data.samples_per_prompt >= {spec.min_samples} "
                    f"({spec.min_samples_why})"
                )
            rows = 2 if spec.paired else h.samples_per_prompt
            if rows >= 1 and h.micro_batch_size % rows:
                problems.append(
                    f"data.micro_batch_size={h.micro_batch_size} must be a multiple of the {rows} rows "
                    f"each prompt contributes under model.loss_type={self.loss_type}"
                )
            if h.rows_per_step is not None and (h.rows_per_step < 1 or (rows >= 1 and h.rows_per_step % rows)):
                problems.append(
                    f"data.rows_per_step={h.rows_per_step} must be a positive multiple of the {rows} rows each "
                    f"prompt contributes under model.loss_type={self.loss_type}"
                )
        if h.logprob_gap_warn < 0 or h.logprob_gap_stop < 0:
            problems.append("data.logprob_gap_warn and data.logprob_gap_stop must be >= 0 (0 = off)")
        if self.eta <= 0:
            problems.append(f"model.eta must be > 0, got {self.eta}")
        if problems:
            raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))

    # ----------------------------------------------------------------------------------------------- setup
    def _tokenize(self, records: list[PromptRecord], what: str) -> tuple[list[PromptRecord], list[list[int]]]:
        tok = self.trainer.lightning_module.tokenizer
        limit = self.hparams.max_prompt_length
        kept, ids = [], []
        all_ids = []
        if records:
            texts = tok.apply_chat_template([r.messages for r in records], add_generation_prompt=True, tokenize=False)
            all_ids = token_ids(tok, texts)
        for i, (rec, p_ids) in enumerate(zip(records, all_ids, strict=True)):
            if len(p_ids) > limit:
                if self.hparams.overlong_prompts == "error":
                    raise DataError(f"{what} prompt {i} has {len(p_ids)} tokens > data.max_prompt_length={limit}")
                continue
            kept.append(rec)
            ids.append(p_ids)
        if len(kept) < len(records):
            rank_zero_info(
                f"{what}: filtered {len(records) - len(kept)} of {len(records)} prompts longer than "
                f"data.max_prompt_length={limit} tokens"
            )
        if not kept:
            source = getattr(self, f"{what}_source", None)
            where = f" ({source.describe()})" if hasattr(source, "describe") else ""
            raise DataError(
                f"data.{what}{where}: no prompt left after filtering by data.max_prompt_length={limit} "
                + (f"(the shortest has {min(len(p) for p in all_ids)} tokens)" if all_ids else "(the source is empty)")
            )
        return kept, ids

    @property
    def group_rows(self) -> int:
        """Rows each prompt contributes: winner and loser under a paired loss type, else all K."""
        return 2 if LOSSES[self.loss_type].paired else self.hparams.samples_per_prompt

    def setup(self, stage: str) -> None:
        if stage == "fit":
            trainer = self.trainer
            if self.configured_accumulate is None:  # later iterations set the trainer's value (train_dataloader)
                self.configured_accumulate = trainer.accumulate_grad_batches
            h = self.hparams
            if h.prompts_per_epoch is not None and h.prompts_per_epoch < trainer.world_size:
                raise ConfigError(
                    f"data.prompts_per_epoch={h.prompts_per_epoch} leaves a process without a prompt: use at least "
                    f"{trainer.world_size}, one per process"
                )
            self.rows_per_step = resolve_rows_per_step(
                h.rows_per_step, h.micro_batch_size, self.configured_accumulate, trainer.world_size, self.group_rows,
                h.max_tokens_per_micro_batch,
            )  # fmt: skip
        if stage == "fit" and not self.train_prompts:
            self.train_prompts, self.train_prompt_ids = self._tokenize(self.train_source.load(), "train")
        if self.val_source is not None and not self.val_prompts:
            self.val_prompts, self.val_prompt_ids = self._tokenize(self.val_source.load(), "val")

    # ------------------------------------------------------------------------------------------- pipeline
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError(
                "RolloutDataModule generates new data from the current policy every epoch: set "
                "trainer.reload_dataloaders_every_n_epochs=1 (it is "
                f"{trainer.reload_dataloaders_every_n_epochs})"
            )
        progress = trainer.fit_loop.epoch_progress.current
        if progress.processed > progress.completed:
            # Resumed from a checkpoint saved at an iteration's end: Lightning restores that iteration's loop still
            # open and asks for its data, then closes it and asks again for the next iteration's without training a
            # batch of the first. Its rollout (minutes on a GPU recipe) would be generated and thrown away.
            return DataLoader(_MicroBatches([None]), batch_size=None)
        module = trainer.lightning_module
        epoch, seed = trainer.current_epoch, self.hparams.seed
        metrics: dict[str, float] = {}

        indices = shard(
            draw_indices(len(self.train_prompts), self.hparams.prompts_per_epoch, epoch, seed),
            trainer.global_rank,
            trainer.world_size,
        )
        with _timed(metrics, "time/rollout"):
            rollout = self.generate(module, indices, seed=seed * 100_003 + epoch * 1_009 + trainer.global_rank)
        with _timed(metrics, "time/scoring"):
            n = rollout.num_prompts * rollout.group_size
            self.progress("scoring", 0, n)
            rollout = rollout.with_scores(self.judge(rollout, module.device))
            self.progress("scoring", n, n)
        # softmean's baseline is over the whole rollout batch, every rank's share (on the device: NCCL has no CPU)
        rewards_all = trainer.strategy.all_gather(rollout.rewards.to(module.device)).reshape(-1).cpu()
        groups = build_groups(rollout, self.loss_type, self.eta, rewards_all=rewards_all)
        batches = self.plan_steps(rollout, groups, len(indices), seed + epoch, metrics)
        if rollout.sampler_logprobs is not None:  # the engine reported its own: does it sample from the policy?
            metrics.update(self.logprob_gap(batches, f"iteration {epoch}"))
        h = self.hparams
        metrics.update(rollout_metrics(rollout))
        metrics["rollout/unscored"] = float(rollout.unscored)  # responses the oracle could not score (scored 0)
        stop = {module.tokenizer.eos_token_id}
        metrics["rollout/truncated_share"] = health.truncated_share(rollout.response_ids, h.max_response_length, stop)
        self.rollout_metrics, self.rollout = metrics, rollout
        # An iterable dataset: the micro-batches are already this rank's share, and Lightning replaces the sampler
        # of a map-style dataset with a DistributedSampler, which would shard them a second time.
        return DataLoader(_MicroBatches(batches), batch_size=None)

    def plan_steps(
        self, rollout: Rollout, groups: list, num_prompts: int, seed: int, metrics: dict
    ) -> list[TrainBatch]:
        """Stage: this rank's micro-batches, ``rows_per_step`` rows over all ranks per optimizer step (``steps``),
        every step the same number of micro-batches on every rank (Lightning's ``accumulate_grad_batches``, set here
        for the iteration), with their π_t log-probs and step shares.

        A rank whose groups all dropped out (ties under DPO/IPO) trains zero-weight fillers, so the others still
        train; the rollout's ``rollout/dropped_groups`` and ``rollout/filler_micro_batches`` say so. When every
        rank's did, the iteration makes no step (a warning says how many groups tied).
        """
        trainer, module, h = self.trainer, self.trainer.lightning_module, self.hparams
        spec = LOSSES[self.loss_type]
        steps = steps_per_rollout(num_prompts * trainer.world_size * self.group_rows, self.rows_per_step)
        cut = partial(micro_batches, micro_batch_size=h.micro_batch_size, pad_id=module.tokenizer.pad_token_id,
                      seed=seed, balance_tokens=h.balance_tokens, max_tokens=h.max_tokens_per_micro_batch,
                      paired=spec.paired, grouped=spec.grouped)  # fmt: skip
        metrics["rollout/dropped_groups"] = float(num_prompts - len(groups))
        if not int(self.all_ranks_sum(torch.tensor([float(len(groups))]))[0]):  # nothing to learn on any rank
            rank_zero_warn(
                f"all {num_prompts * trainer.world_size} groups of this iteration dropped out (model.loss_type="
                f"{self.loss_type} skips prompts whose responses all tie): no optimizer step this iteration"
            )
            metrics["rollout/filler_micro_batches"], metrics["rollout/optimizer_steps"] = 0.0, 0.0
            return []
        per_step = cut_into_steps(groups, num_prompts, steps, seed, cut)
        size = micro_batches_per_step(max(map(len, per_step)), lambda n: self.most_and_fewest_on_any_rank(n)[0])
        mine = [b for step in per_step for b in step]
        template = mine or [placeholder(rollout, module.tokenizer.pad_token_id, spec.paired)]
        if not mine and num_prompts:
            warnings.warn(
                f"rank {trainer.global_rank}: all {num_prompts} of its groups dropped out (model.loss_type="
                f"{self.loss_type} skips prompts whose responses all tie): it trains zero-weight fillers this "
                "iteration, the other ranks' rows make the steps",
                stacklevel=2,
            )
        per_step = top_up(per_step, size, lambda: filler(template))
        batches = [b for step in per_step for b in step]
        metrics["rollout/filler_micro_batches"] = float(sum(b.filler for b in batches))
        metrics["rollout/optimizer_steps"] = float(steps * h.passes_per_rollout)
        with _timed(metrics, "time/ref_logprobs"):
            self.attach_ref_logps(module, batches)
        batches = [b for step in passes(per_step, h.passes_per_rollout, seed) for b in step]
        trainer.accumulate_grad_batches = size  # Lightning steps the optimizer once per `size` micro-batches
        attach_step_units(batches, size, self.all_ranks_sum)
        return batches

    def judge(self, rollout: Rollout, device: torch.device) -> Scores:
        """Stage: the oracle's rewards and win-rates for the rollout (an oracle returns them, it changes nothing)."""
        scores = self.oracle.score(rollout, device=device)
        if not isinstance(scores, Scores):  # an oracle written for the old API filled in the rollout instead
            raise ConfigError(
                f"data.oracle {type(self.oracle).__qualname__}.score returned {type(scores).__name__}: an oracle "
                "returns sppo_lightning.records.Scores (rewards and win-rates, [prompts, samples] each)"
            )
        return scores

    def logprob_gap(self, batches: list[TrainBatch], when: str) -> dict[str, float]:
        """Stage: mean and max per-token |log π_sampler − log π_t| over the real rows of every rank (the same on all of
        them, so that the guard stops every rank or none), checked against ``data.logprob_gap_warn``/``_stop``."""
        parts = [
            health.gap_sums(b.sampler_logps, b.ref_logps, health.valid_columns(b.response_mask.sum(1), b.ref_logps))
            for b in batches
            if not b.filler and b.sampler_logps is not None and b.ref_logps is not None
        ]
        local = torch.stack(parts).reshape(-1, 3) if parts else torch.zeros(1, 3)
        mine = torch.stack([local[:, 0].sum(), local[:, 1].sum(), local[:, 2].max()])
        if self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            mine = strategy.all_gather(mine.to(strategy.root_device)).cpu()
        mean, largest = health.combine_gap(mine)
        health.GapGuard(self.hparams.logprob_gap_warn, self.hparams.logprob_gap_stop).check(
            mean, largest, when, type(self.engine).__name__
        )
        return {"rollout/logprob_gap_mean": mean, "rollout/logprob_gap_max": largest}

    def check_validation_sampler(self, module, prompt_ids: list[list[int]], samples: Samples, when: str) -> None:
        """Stage (validation): the log-prob gap guard on the first ``micro_batch_size`` responses of a pass's first
        batch, for an engine that holds its own copy of the weights. The rollout's check comes only after the
        validation before the first update, whose samples would otherwise go unchecked; one no-grad forward of one
        micro-batch per pass, the same on every rank (under FSDP the forwards must match)."""
        rows = [
            Example(p, r, 0.0, 0.5, 0.0, group=i, sampler_logps=lp)
            for i, (p, group, lps) in enumerate(
                zip(prompt_ids, samples.response_ids, samples.sampler_logprobs, strict=True)
            )
            for r, lp in zip(group, lps, strict=True)
        ][: self.hparams.micro_batch_size]
        batch = collate(rows, module.tokenizer.pad_token_id)
        self.attach_ref_logps(module, [batch])
        self.logprob_gap([batch], when)

    def most_and_fewest_on_any_rank(self, count: int) -> tuple[int, int]:
        if self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            counts = strategy.all_gather(torch.tensor(count, device=strategy.root_device))
            return int(counts.max()), int(counts.min())
        return count, count

    def all_ranks_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over ranks."""
        return sharding.sum_over_ranks(self.trainer, values)

    def sampling_params(self) -> SamplingParams:
        h = self.hparams
        return SamplingParams(
            n=h.samples_per_prompt,
            temperature=h.temperature,
            top_p=h.top_p,
            top_k=h.top_k,
            max_new_tokens=h.max_response_length,
            logprobs=True,  # π_t's log-probs come with the samples when the engine has them (else a forward pass)
        )

    def progress(self, stage: str, done: int, total: int, tokens: int = 0) -> None:
        """Tell callbacks that implement ``on_rollout_progress`` how far a long stage has come."""
        for callback in self.trainer.callbacks:
            if hasattr(callback, "on_rollout_progress"):
                callback.on_rollout_progress(self.trainer, stage, done, total, tokens)

    def generate(self, module, indices: list[int], seed: int) -> Rollout:
        """Stage: K responses per drawn prompt from the current policy, decoded once for the oracle."""
        prompt_ids = [self.train_prompt_ids[i] for i in indices]
        total = len(prompt_ids) * self.hparams.samples_per_prompt
        policy = module.policy_handle()  # all the engine sees of the module
        self.progress("rollout", 0, total)
        self.engine.on_progress = lambda done, tokens: self.progress("rollout", done, total, tokens)
        try:
            samples = self.engine.generate(policy, prompt_ids, self.sampling_params(), seed)
        finally:
            self.engine.on_progress = None  # validation generates through the same engine, unreported
        self.progress("rollout", total, total, sum(len(r) for group in samples.response_ids for r in group))
        self.engine.after_rollout(policy)
        tok = policy.tokenizer
        return Rollout(
            prompts=[self.train_prompts[i] for i in indices],
            prompt_ids=prompt_ids,
            response_ids=samples.response_ids,
            response_text=[[tok.decode(r, skip_special_tokens=True) for r in group] for group in samples.response_ids],
            response_logprobs=samples.logprobs,
            sampler_logprobs=samples.sampler_logprobs,
        )

    @staticmethod
    def attach_ref_logps(module, batches: list[TrainBatch]) -> None:
        """Stage: log π_t(y_t | x, y_<t) for every response token, computed once by the policy before any update of
        this iteration, on exactly the micro-batches training will see (so the first step's log-ratio is exactly 0)."""

        def attach() -> None:
            for batch in batches:
                if batch.ref_logps is not None:  # supplied by the engine with the rollout
                    continue
                batch.ref_logps = module.token_logps(move_data_to_device(batch, module.device)).float().cpu()

        was_training = module.policy.training
        module.policy.eval()
        try:
            module.run_with_policy(attach)
        finally:
            module.policy.train(was_training)

    # ----------------------------------------------------------------------------------------- validation
    def val_dataloader(self) -> DataLoader:
        """This rank's share of the validation prompts, in batches; over all ranks each prompt is scored once.

        Rank r takes prompts r, r + world_size, ... A rank whose share is one prompt short generates for one prompt
        of the set again, so that every rank runs the same ``generate`` calls (sharded weights are gathered inside
        every forward), but does not score it: a batch's ``prompt_ids`` may have rows past its ``records``, which
        name the rows to score, first.
        """
        h = self.hparams
        params = SamplingParams(
            n=h.val_samples_per_prompt,
            temperature=h.val_temperature,
            top_p=h.top_p,
            max_new_tokens=h.max_response_length,
        )
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        items = list(zip(self.val_prompt_ids, self.val_prompts, strict=True))
        mine = items[rank::world]
        rows = mine + [(items[0][0], None)] * (-(-len(items) // world) - len(mine))  # padding: no record
        batches = []
        for start in range(0, len(rows), h.val_batch_size):
            chunk = rows[start : start + h.val_batch_size]
            batches.append(ValBatch([ids for ids, _ in chunk], [rec for _, rec in chunk if rec is not None], params))
        # An iterable dataset, like training's: Lightning would otherwise shard a second time with a
        # DistributedSampler, which pads by duplicating prompts.
        return DataLoader(_MicroBatches(batches), batch_size=None)


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """``tok(texts, add_special_tokens=False)["input_ids"]``, one batched call (a third of the time of a call per text).

    A fast tokenizer's own Rust batch call gives the same ids in half the time on the demo's 9,000 short prompts
    (0.45 -> 0.24 s): ``tok(...)`` also builds offsets and a ``BatchEncoding`` per text. Padding the Rust tokenizer
    carries (the toy model's does) is switched off for the call, as ``tok(...)`` does, and restored after it; one that
    truncates goes through ``tok(...)``."""
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation is not None:
        return tok(texts, add_special_tokens=False)["input_ids"]
    padding = backend.padding
    if padding is not None:
        backend.no_padding()
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        if padding is not None:
            backend.enable_padding(**padding)


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """What an iteration's samples looked like: reward, length, and how much preference signal they carry."""
    lengths = torch.tensor([len(r) for group in rollout.response_ids for r in group], dtype=torch.float32)
    rewards, win_rates = rollout.rewards, rollout.win_rates
    all_tie = (win_rates.max(dim=1).values == win_rates.min(dim=1).values).float()
    return {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "rollout/response_length": float(lengths.mean()),
        "rollout/empty_share": sum(not t.strip() for g in rollout.response_text for t in g) / lengths.numel(),
        "rollout/all_tie_share": float(all_tie.mean()),
        "rollout/winner_win_rate": float(win_rates.max(dim=1).values.mean()),
        "rollout/loser_win_rate": float(win_rates.min(dim=1).values.mean()),
    }
