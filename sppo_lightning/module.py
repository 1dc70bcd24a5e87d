"""SPPOModule: the policy, the step and the optimizer.

The module owns everything that has gradients. π_t is not a second model: its log-probs are computed by this
policy, under ``no_grad``, at the start of each iteration (``token_logps``) and arrive in the batch.

Elsewhere: validation scoring (accuracy, win rate, the reference responses) is ``evaluation.Validation``'s, the
module only generates for it; the per-iteration record (rollout metrics, ``time/train``, ``time/validation``) is
``phases.IterationRecord``'s, a callback the module installs itself (``configure_callbacks``).

What the module reads from the datamodule is ``evaluation.ValidationSource``: the engine that generates validation
responses, the oracle that judges the win rate, the validation prompts (the accuracy's groups) and
``val_dataloader()`` (for the evaluation before the first update, which Lightning's loop does not run); and, once at
``setup``, its ``loss_type`` and ``eta`` to check that both halves got the same (the CLI links them).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning import attention, health, loading, optim, phases, sharding
from sppo_lightning import lora as lora_lib
from sppo_lightning.errors import ConfigError, check_tokenizer, refusing_remote_code
from sppo_lightning.evaluation import Validation, ValidationSource, win_rate_enabled
from sppo_lightning.guard import NonFiniteGuard
from sppo_lightning.logprobs import (
    collecting_entropy,
    packed_token_logps,
    response_token_logps,
    shared_prompt_token_logps,
)
from sppo_lightning.lora import LoRA
from sppo_lightning.loss import LOSS_TYPES, LOSSES, LossParams, LossTerms, loss_weights, trust_region_logps
from sppo_lightning.records import SamplingParams, TrainBatch
from sppo_lightning.rewards.base import Oracle
from sppo_lightning.rewards.math import compute_score
from sppo_lightning.rollout.base import PolicyHandle, RolloutEngine
from sppo_lightning.rollout.hf import HFEngine

REFERENCE_FILE = "reference_responses.jsonl"
"""Under ``trainer.default_root_dir``: the starting policy's validation responses, the win rate's reference."""

LossType = Literal[LOSS_TYPES]


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere in ``model``, so that train mode computes what eval mode does.

    ``nn.Dropout`` layers are not enough (TRL's ``disable_dropout_in_model`` stops there): transformers' attention
    modules pass a float rate to the attention kernel (``self.attention_dropout``, Qwen2, Llama, ...) and a few read
    it from the config at forward time. Rates are zeroed in the modules and the in-memory config; the folder is
    untouched, so an export keeps the model's own config.
    """
    configs = {id(c): c for c in (model.config, model.config.get_text_config())} if hasattr(model, "config") else {}
    for owner in (*model.modules(), *configs.values()):
        if isinstance(owner, torch.nn.modules.dropout._DropoutNd):
            owner.p = 0.0
        for name, value in list(vars(owner).items()):
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                setattr(owner, name, 0.0)


class SPPOModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        loss_type: LossType = "sppo",
        eta: float = 1.0,
        clip_ratio: float | None = None,
        dpo_beta: float = 0.1,
        ipo_tau: float = 0.1,
        inpo_tau: float = 0.1,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.01,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        warmup_unit: optim.WarmupUnit = "step",
        weight_decay_on: optim.DecayOn = "matrices",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = "auto",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        share_prompt: bool = True,
        packed: bool = False,
        fsdp_param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        fsdp_cpu_offload: bool = False,
        max_nonfinite_steps: int = 10,
        accuracy_fn: Callable[[str, str], float] = compute_score,
        val_win_rate: bool | None = None,
        lora: LoRA | None = None,
        base_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        val_judge: Oracle | None = None,
        kl_metrics: bool = True,
    ):
        """
        Args:
            model_name_or_path: A hub id or a local folder, loaded with ``from_pretrained``.
            loss_type: ``sppo`` (all K samples, the paper), ``sppo_pair`` (winner and loser, the authors' code),
                ``sppo_softmean`` (η(r − SoftMean_η(r)), the verl recipe), ``dpo`` or ``ipo`` (iterative DPO / IPO
                baselines, on the winner and the loser); each is one entry of ``loss.LOSSES``. Linked into
                ``data.loss_type`` by the CLI: the datamodule lays the rows out for it.
            eta: η, the step size of the multiplicative-weights update; SPPO targets are η(P̂ − ½). Linked into
                ``data.eta``: the pipeline computes the targets, which every SPPO variant trains on.
            clip_ratio: ε of a per-token trust region on the SPPO regressions (not in the paper): a token whose
                ratio π_θ/π_t has left [1 − ε, 1 + ε] in the direction its row is pushed stops receiving gradient,
                as in PPO. None = the paper's loss. It lets a large η and several passes over a rollout
                (``data.passes_per_rollout``) pay off; not used by ``dpo`` and ``ipo``.
            dpo_beta: β of the DPO baseline and of DNO's soft-labelled pairs (``loss_type: dpo``, ``dno``).
            ipo_tau: τ of the IPO baseline (only for ``loss_type: ipo``): the winner-minus-loser log-ratio, averaged
                over each response's tokens as in TRL, is regressed onto 1/(2τ).
            inpo_tau: τ of ``loss_type: inpo``: the KL regularisation towards the starting policy π_ref (the model as
                loaded), whose log-ratio enters INPO's h with weight ητ (≤ 1), π_t's with 1 − ητ (``loss.inpo_loss``).
                π_ref needs a frozen copy of the starting weights (one process, or DDP; not under FSDP); 0 = no
                regularisation and no copy.
            learning_rate: Peak AdamW learning rate, reached after ``warmup_steps``.
            weight_decay: AdamW weight decay, on the parameters ``weight_decay_on`` names.
            adam_betas: AdamW betas.
            warmup_steps: Length of the linear warm-up from 0, in ``warmup_unit``s; then constant.
            warmup_unit: ``step``: the learning rate grows per optimizer step, (k + 1) / warmup_steps at step k.
                ``rollout``: it grows per iteration, k / warmup_steps at rollout k (0-based), as verl's scheduler,
                which steps once per rollout: the first rollout then trains at lr 0.
            weight_decay_on: ``matrices``: parameters of 2+ dimensions (as they were before sharding), not biases
                and norm weights. ``all``: every parameter, as verl's actor.
            dtype: Parameter dtype of the policy.
            attn_implementation: ``auto`` (packed rows: ``flash_attention_2`` if installed, else PyTorch's
                ``varlen_attn`` on CUDA, else one ``sdpa`` call per row; padded rows: ``sdpa``), ``flash_attention_2``,
                ``varlen_attn``, ``sdpa``, ``eager``. Decided before the weights are fetched (see ``attention``);
                a backend that cannot run here stops the run. None = ``auto``.
            trust_remote_code: Run a model repository's own code. Off unless you trust its author.
            gradient_checkpointing: Recompute activations in backward to save memory (generation still uses the
                KV cache).
            disable_dropout: Turn every dropout of the policy off (as TRL does). Generation and the π_t pass run in
                eval mode, training in train mode: with dropout the first step's log-ratio is not 0 and a resumed run
                draws other masks. False keeps the model's dropout.
            share_prompt: Run each prompt once per micro-batch and its K responses from its KV cache, in training and
                in the π_t pass (same values, fewer tokens). Off under gradient checkpointing, which disables the
                cache in training. Decided from these settings alone, the same on every rank; with one sample per
                prompt there is nothing to share: set it to false. With ``packed``, the prompt and its K responses
                are packed as one sequence instead (``sdpa``/``eager`` attention; not under ``flash_attention_2`` or
                ``varlen_attn``, which pack whole rows).
            packed: Lay a micro-batch's rows end to end with no padding, attention kept within each row (verl's
                ``use_remove_padding``): the variable-length kernel of ``flash_attention_2`` or ``varlen_attn``, one
                attention call per row under ``sdpa``/``eager`` (sliding windows and soft-capping kept). Same values and
                gradients as the padded rows, with or without gradient checkpointing.
            fsdp_param_dtype: Under ``ModelParallelStrategy`` (FSDP2): the dtype layers compute in, gradients are
                reduced in float32. None = bfloat16 on GPU, the stored dtype on CPU.
            fsdp_cpu_offload: Under FSDP2: keep sharded parameters, gradients and optimizer state in CPU memory.
            max_nonfinite_steps: A step whose loss or gradient is NaN/inf is skipped and counted
                (``train/skipped_steps``); this many in a row stop the run. 0 = never stop.
            accuracy_fn: ``f(response_text, ground_truth) -> float`` used for ``val/accuracy``.
            val_win_rate: Log ``val/win_rate``, the oracle's mean preference of the policy's validation responses
                over the starting policy's (generated once at the start of fit, kept in
                ``<default_root_dir>/reference_responses.jsonl`` and reused on resume), with ``val/response_length``
                and ``val/reference_length``. None = on when ``data.oracle`` is a preference oracle (pairwise or
                reward model), off for the rule oracle. Beside it ``val/win_rate_lc``, AlpacaEval 2's length-controlled
                win rate (``lc_win_rate``): the same preferences read at zero length difference.
            lora: Train LoRA adapters (PEFT) instead of every weight: ``--model.lora.r=16`` turns it on with the other
                fields defaulted (``lora.LoRA``). None = full fine-tuning. π_t is the adapter policy at the iteration's
                start; the optimizer holds only the adapters; checkpoints keep the adapters and their optimizer state;
                engines and ``hf_model/`` get the merged weights, ``hf_adapter/`` the PEFT adapter.
            base_dtype: With ``lora``: the dtype the frozen base weights are kept in (``bfloat16`` halves their memory)
                while the adapters train in ``dtype``. None = ``dtype``.
            val_judge: The judge of ``val/win_rate`` (any oracle: pairwise, PairRM, reward model, rule), held out from
                training so that a policy cannot raise it by exploiting the training judge; None = the training
                oracle (``data.oracle``). When both are set, the training oracle's figures are logged too
                (``val/win_rate_train_judge``, ``val/win_rate_lc_train_judge``).
            kl_metrics: Log ``train/kl_pi_t`` and ``train/kl_initial`` every iteration (``health``): one no-grad
                forward over a micro-batch each, at the iteration's end (8 % of the demo's time on a CPU, next to
                nothing where the rollout and the steps dominate). False skips both forwards, as TRL computes its KL
                only when ``beta`` > 0; ``train/entropy`` comes from the training forward and stays. The probe for
                ``train/kl_initial`` is kept either way, so a run resumed with it on measures against π_0.
        """
        super().__init__()
        if eta <= 0:
            raise ConfigError(f"model.eta must be > 0, got {eta}")
        if clip_ratio is not None and not 0 < clip_ratio < 1:
            raise ConfigError(f"model.clip_ratio must be in (0, 1) or null, got {clip_ratio}")
        if ipo_tau <= 0:
            raise ConfigError(f"model.ipo_tau must be > 0, got {ipo_tau}")
        if loss_type == "inpo" and not 0 <= eta * inpo_tau <= 1:
            raise ConfigError(f"model.eta * model.inpo_tau must be in [0, 1] (INPO's π_ref weight): {eta * inpo_tau}")
        if loss_type not in LOSSES:
            raise ConfigError(f"model.loss_type must be one of {', '.join(LOSSES)}, got {loss_type!r}")
        if clip_ratio is not None and not LOSSES[loss_type].clip:
            raise ConfigError(
                f"model.clip_ratio applies to the SPPO regressions, not to loss_type {loss_type}: set it to null"
            )
        if base_dtype is not None and lora is None:
            raise ConfigError("model.base_dtype is for the frozen base of a LoRA run: set model.lora or leave it out")
        self.save_hyperparameters(ignore=["accuracy_fn", "val_judge"])
        self.hparams["lora"] = lora_lib.as_record(lora)  # plain data: a checkpoint loads with weights_only
        self.lora = lora_lib.as_lora(lora)
        self.strict_loading = self.lora is None  # a LoRA checkpoint holds the adapters only (see ``state_dict``)
        self.policy = None
        self.tokenizer = self._load_tokenizer()
        # accuracy, the win rate by model.val_judge (else data.oracle), the reference (evaluation.py)
        self.validation = Validation(accuracy_fn, self.tokenizer, val_judge)
        self._gap_probe_due: str | None = None  # the validation pass whose first batch the gap guard checks
        self.initial_val_accuracy: float | None = None  # the evaluation before the first update (callbacks read it)
        self.initial_val_seconds: float | None = None
        self.guard = NonFiniteGuard(max_nonfinite_steps, self._sum_over_ranks)
        self.health = health.IterationHealth(kl_metrics)  # train/entropy, train/kl_pi_t, train/kl_initial
        self._nonfinite_in_step = False  # a micro-batch of the current optimizer step had a non-finite loss
        self._initial: tuple[torch.nn.Module, ...] = ()  # π_ref for INPO, kept out of the state dict (a tuple)

    @property
    def accuracy_fn(self) -> Callable[[str, str], float]:
        """``f(response_text, ground_truth) -> float`` behind ``val/accuracy`` (``model.accuracy_fn``)."""
        return self.validation.accuracy_fn

    # ----------------------------------------------------------------------------------------------- model
    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        path = self.hparams.model_name_or_path
        with refusing_remote_code(path, "model.trust_remote_code"):
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=self.hparams.trust_remote_code)
        check_tokenizer(tok, path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def configure_model(self) -> None:
        """Load the policy (called by Lightning inside the strategy's context; idempotent). Under FSDP2 it is built on
        the meta device, sharded, and its weights read once by rank 0 (``loading``): one copy in host memory, not
        one per rank."""
        if self.policy is not None:
            return
        h = self.hparams
        if self.lora is not None and self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ConfigError(
                "model.lora with trainer.strategy=FSDPStrategy (FSDP1) is not supported: use "
                "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2), which shards frozen and trainable "
                "parameters in the same units"
            )
        backend = self.resolve_attention()
        load_dtype = h.base_dtype if self.lora is not None and h.base_dtype is not None else h.dtype
        source = loading.PolicySource(
            h.model_name_or_path, load_dtype, attention.load_implementation(backend), h.trust_remote_code
        )
        if self.device_mesh is not None:  # ModelParallelStrategy: shard with FSDP2
            mesh = sharding.data_parallel_mesh(self.device_mesh)
            param_dtype = h.fsdp_param_dtype or ("bfloat16" if mesh.device_type == "cuda" else None)
            device = torch.device("cpu") if h.fsdp_cpu_offload else self.trainer.strategy.root_device
            self.policy = loading.load_sharded_once(
                lambda on_meta: self._prepared(source.build(on_meta), backend),
                lambda policy: sharding.fully_shard_policy(policy, mesh, param_dtype, h.fsdp_cpu_offload),
                device,
            )
            return
        self.policy = self._prepared(source.load(), backend)
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            sharding.default_fsdp1_wrap_policy(self.policy, self.trainer.strategy)
            sharding.fsdp1_mixed_precision(self.trainer.strategy)

    def _prepared(self, policy: torch.nn.Module, backend: str) -> torch.nn.Module:
        """``policy`` as it trains, before any wrapper: its attention backend, the LoRA adapters, train mode, dropout
        and gradient checkpointing as configured."""
        attention.install(policy, backend)  # packed rows then survive gradient checkpointing
        if self.lora is not None:  # before any wrapper: adapters on the plain model, the base frozen
            policy = lora_lib.apply_lora(policy, self.lora, getattr(torch, self.hparams.dtype))
        policy.train()  # from_pretrained returns the model in eval mode
        # shapes before any wrapper flattens them (FSDP1's shards are 1-D): configure_optimizers decides decay by them
        self._param_ndims = optim.param_ndims((sharding.POLICY_PREFIX + n, p) for n, p in policy.named_parameters())
        if self.hparams.disable_dropout:
            disable_dropout(policy)
        if self.hparams.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return policy

    @torch.no_grad()
    def run_with_policy(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, which calls the policy outside a Lightning step (the rollout, the π_t pass, the first validation);
        under FSDP1 through the wrapper's forward, where its root's weights are gathered (see ``sharding``)."""
        return sharding.run_with_policy(self._trainer, fn)

    def full_parameters(self) -> AbstractContextManager:
        """A context in which the policy's parameters can be read whole (what FSDP1 needs, see ``sharding``)."""
        return sharding.full_parameters(self._trainer)

    def full_policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights on CPU, complete on rank 0; a collective under FSDP (every rank calls it). With
        LoRA, the merged weights under the base model's names (what an engine or ``from_pretrained`` loads)."""
        return self.export_state_dicts()[0]

    def export_state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``(full weights, PEFT adapter or None)`` on CPU, complete on rank 0, from one gather (a collective under
        FSDP). With LoRA the full weights are merged (``lora.merged_tensors``); the model itself stays unmerged."""
        state = sharding.full_policy_state_dict(self.policy, self._trainer)
        if self.lora is None:
            return state, None
        if not state:  # ranks other than 0 may get nothing
            return {}, {}
        return lora_lib.merged_state_dict(self.policy, state), lora_lib.adapter_state_dict(self.policy, state)

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """With LoRA, only the parameters that train: checkpoints keep the adapters (and the optimizer their
        moments); the frozen base is read from ``model_name_or_path`` again on resume (``strict_loading`` off).
        FSDP2's distributed checkpoint builds its state from this too, so it saves and loads the adapters only."""
        state = super().state_dict(*args, **kwargs)
        if self.lora is None or self.policy is None:
            return state
        keep = lora_lib.trainable_keys(self, kwargs.get("prefix", ""))
        return type(state)((k, v) for k, v in state.items() if k in keep)

    def policy_handle(self) -> PolicyHandle:
        """What an engine may touch of the policy (see ``PolicyHandle``): the rank, world size, run folder and
        strategy come from the trainer when one is attached; otherwise one unsharded process in the working folder."""
        handle = PolicyHandle(
            policy=self.policy,
            tokenizer=self.tokenizer,
            name_or_path=self.hparams.model_name_or_path,
            trust_remote_code=self.hparams.trust_remote_code,
            step=self.global_step,
            device=self.device,
            run=self.run_with_policy,
            full_parameters=self.full_parameters,
            full_state_dict=self.full_policy_state_dict,
        )
        trainer = self._trainer
        if trainer is None:
            return handle
        return replace(
            handle,
            device=trainer.strategy.root_device,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            output_dir=Path(trainer.default_root_dir),
            fsdp1=isinstance(trainer.strategy, FSDPStrategy),
            barrier=trainer.strategy.barrier,
        )

    def token_logps(self, batch: TrainBatch) -> torch.Tensor:
        """log π_θ(y_t | x, y_<t) of every response token of a micro-batch, ``[B, R]`` (see ``logprobs``).

        The path follows from the settings only, never from the data: under FSDP every rank must run the same
        forwards, or the collectives stop matching.
        """
        h = self.hparams
        rows = (batch.input_ids, batch.attention_mask, batch.response_mask)
        if h.packed:  # the prompt shared inside the packed sequence, except under varlen kernels (see logprobs)
            return packed_token_logps(self.policy, *rows, batch.prompt_lengths, share_prompt=h.share_prompt)
        if h.share_prompt and not h.gradient_checkpointing:
            return shared_prompt_token_logps(self.policy, *rows, batch.prompt_lengths)
        return response_token_logps(self.policy, *rows)

    # -------------------------------------------------------------------------------------------- training
    def resolve_attention(self) -> str:
        """The attention backend (``attention.resolve_attention``), decided once, printed once and logged with the
        hyperparameters as ``attn_backend``; a requested backend that cannot run raises ``ConfigError``."""
        if getattr(self, "_attn_backend", None) is None:
            trainer = self._trainer
            device = trainer.strategy.root_device if trainer is not None else self.device
            name, why = attention.resolve_attention(self.hparams.attn_implementation, self.hparams.packed, device)
            self._attn_backend = name
            rank_zero_info(f"attention: {name} ({why})")
            for logger in trainer.loggers if trainer is not None else []:
                logger.log_hyperparams({"attn_backend": name})
        return self._attn_backend

    def setup(self, stage: str) -> None:
        self.resolve_attention()  # before configure_model: a backend that cannot run stops before the download
        # The datamodule lays the rows out for a loss type and computes their targets with η: the CLI links both from
        # model.*; halves built by hand in Python must agree too. Read from the datamodule's own public settings.
        data = self.trainer.datamodule if self._trainer is not None else None
        mismatched = [
            f"model.{key}={mine!r} but data.{key}={getattr(data, key)!r}"
            for key, mine in (("loss_type", self.hparams.loss_type), ("eta", self.hparams.eta))
            if hasattr(data, key) and getattr(data, key) != mine
        ]
        if mismatched:
            raise ConfigError(
                f"the module and the datamodule disagree: {'; '.join(mismatched)} (the CLI links them; "
                "in Python pass the same values to both)"
            )

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        spec = LOSSES[self.hparams.loss_type]  # what the loss type is and how its batch is laid out
        if batch.paired != spec.paired:
            raise ValueError(f"model.loss_type={self.hparams.loss_type} got a batch with paired={batch.paired}")
        with collecting_entropy() as entropy:  # train/entropy from this forward's logits
            token_logps, ref_tokens = self.token_logps(batch), batch.ref_logps  # (B, R) each
        self._observe_health(batch, batch_idx, entropy)
        clip = self.hparams.clip_ratio
        if clip is None:
            logps = token_logps.sum(-1)
        else:
            logps, held = trust_region_logps(token_logps, ref_tokens, batch.targets, clip)
            share = held.sum() / batch.response_mask.sum()  # of the response tokens
            self.log("train/clipped_tokens", share, batch_size=len(logps), sync_dist=True)
        ref = ref_tokens.sum(-1)
        params = LossParams(**{f.name: self.hparams[f.name] for f in fields(LossParams)})  # same-named model.* keys
        initial = self.initial_logps(batch) if spec.needs_initial and spec.needs_initial(params) else None
        terms = (logps, ref, batch.targets, batch.response_mask.sum(-1).clamp(min=1), batch.win_rates)
        if spec.paired:
            terms = tuple(batch.pairs(v) for v in terms)  # (B/2, 2) each: every prompt's (winner, loser)
        elif spec.grouped:
            terms = tuple(batch.groups(v) for v in terms)  # (B/K, K) each: every prompt's K responses
            initial = None if initial is None else batch.groups(initial)
        preferences = batch.groups(batch.preferences) if spec.needs_preferences else None  # (B/K, K, K)
        x = LossTerms(*terms, preferences=preferences, initial_logps=initial)
        losses = spec.compute(x, params)  # (B,), (B/2,) or (B/K,)
        loss, mean, n = self._step_share(losses, batch)
        if not self.guard.all_finite(loss):  # the same verdict on every rank
            self._nonfinite_in_step = True  # the whole optimizer step is dropped (on_before_optimizer_step)
            return loss  # backward still runs, its gradient dropped: sharded ranks meet in its collectives
        # sync_dist: under FSDP/DDP each rank trains on its own rows; the logged value is their mean.
        self.log("train/loss", mean, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/log_ratio", (logps - ref).mean().detach(), batch_size=n, sync_dist=True)
        if spec.target is not None:  # a loss without a target (DPO, IPO) has 0s there
            self.log("train/target", batch.targets.mean(), batch_size=n, sync_dist=True)
        return loss

    def _observe_health(self, batch: TrainBatch, batch_idx: int, entropy: list) -> None:
        if batch_idx == 0 and self.current_epoch == 0:  # π_0's log-probs of real samples: train/kl_initial's probe
            self.health.keep_probe(batch)
        self.health.observe(batch, None if batch.filler or not entropy else torch.stack(entropy).sum(0))

    def on_train_epoch_start(self) -> None:
        self.health.start_iteration()

    def iteration_health(self) -> dict[str, float]:
        """This iteration's ``train/entropy``, ``train/kl_pi_t`` and ``train/kl_initial`` (``health``), the same on
        every rank; every rank calls it (the forwards and the sum are collectives under FSDP)."""
        row_sets = [
            SimpleNamespace(**{k: v.to(self.device) for k, v in rows.items()}) for rows in self.health.to_score()
        ]
        if not row_sets:  # model.kl_metrics=false: no forward (the same on every rank, a setting)
            return self.health.metrics(self._sum_over_ranks, [])
        was_training = self.policy.training
        self.policy.eval()
        try:
            scored = self.run_with_policy(lambda: [self.token_logps(rows) for rows in row_sets])
        finally:
            self.policy.train(was_training)
        return self.health.metrics(self._sum_over_ranks, scored)

    @torch.no_grad()
    def initial_logps(self, batch: TrainBatch) -> torch.Tensor:
        """log π_ref(y|x) of the starting policy (the model as loaded, frozen), ``[B]``: INPO's reference. A copy of the
        starting weights, loaded once; not under FSDP, where it would need its own sharding."""
        if not self._initial:
            if self.device_mesh is not None or isinstance(self._trainer and self.trainer.strategy, FSDPStrategy):
                raise ConfigError(
                    "model.loss_type=inpo with model.inpo_tau > 0 keeps a copy of the starting policy, not supported "
                    "under FSDP: set model.inpo_tau=0, or train on one process or with DDP"
                )
            h, backend = self.hparams, self.resolve_attention()
            implementation = attention.load_implementation(backend)
            initial = loading.PolicySource(h.model_name_or_path, h.dtype, implementation, h.trust_remote_code).load()
            self._initial = (initial.eval().requires_grad_(False).to(self.device),)
        rows = (batch.input_ids, batch.attention_mask, batch.response_mask)
        return response_token_logps(self._initial[0], *rows).sum(-1).float()

    def _step_share(self, losses: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This micro-batch's part of its optimizer step's loss, such that the step's gradient is the mean over every
        loss term of the step on every rank, whatever the split (``batching.attach_step_units``). Also the
        micro-batch's own mean and term count, for the log (0 for a filler, which then weighs nothing in the
        iteration's logged mean).

        Lightning divides what ``training_step`` returns by ``accumulate_grad_batches`` and the gradient reduction
        averages over ranks: both are multiplied back. A batch without ``step_units`` is its own mean, as before.
        """
        weights = loss_weights(batch.row_weight.to(losses.dtype), batch.paired, batch.rows_per_term)  # one per term
        total, n = (losses * weights).sum(), weights.sum()
        mean = total / n.clamp(min=1)
        if batch.step_units is None:
            return mean, mean.detach(), int(n)
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        return total * scale / batch.step_units.clamp(min=1), mean.detach(), int(n)

    def on_before_optimizer_step(self, optimizer) -> None:
        params = [p for p in self.parameters() if p.grad is not None]
        if self._nonfinite_in_step:  # under accumulation the other micro-batches' gradient would still step
            self._drop_step(params, "loss")
            return
        if not params and sharding.fsdp1_root(self._trainer) is None:  # an FSDP1 rank may hold no piece, yet reduces
            return
        # before clipping: the norm it really had
        norm = sharding.global_grad_norm([p.grad for p in params], self._trainer, self.device)
        if not torch.isfinite(norm):  # the norm is over every rank's gradient: the same verdict on all of them
            self._drop_step(params, "gradient")
            return
        self.guard.passed()
        self.log("train/grad_norm", norm)

    def _drop_step(self, params: list[torch.nn.Parameter], what: str) -> None:
        """Skip this optimizer step whole, on every rank (each reached the same verdict), and count it once: AdamW
        leaves parameters without a gradient untouched (no update, no weight decay, no moment change)."""
        for p in params:
            p.grad = None
        self._nonfinite_in_step = False
        self._skip(what)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not sharding.clip_fsdp1_grad_norm(self._trainer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The guard's reduction: every rank must skip together, or the others would wait in the gradient reduction
        forever."""
        return sharding.sum_over_ranks(self._trainer, value)

    def _skip(self, what: str) -> None:
        try:
            self.guard.skip(what, self.global_step)  # raises DivergenceError past model.max_nonfinite_steps in a row
        finally:
            self.log("train/skipped_steps", float(self.guard.skipped_steps), reduce_fx="max")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.guard.save(checkpoint)
        self.health.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.guard.load(checkpoint)
        self.health.load(checkpoint)

    # ------------------------------------------------------------------------------------------ validation
    # Scoring is evaluation.Validation's, for Lightning's loop and the evaluation before the first update alike; the
    # module generates (``_generate``, its one call of the engine) and says when a pass starts and ends.
    def on_train_start(self) -> None:
        """The first point of the learning curve: the policy before any update. With the win rate on, its responses
        are the reference every later validation is judged against (written once; a resumed run reads it back)."""
        data, path = self._validation_source(), Path(self.trainer.default_root_dir) / REFERENCE_FILE
        win_rate = win_rate_enabled(self.hparams.val_win_rate, getattr(data, "oracle", None), self.validation.judge)
        self.validation.reference = None
        if self.global_step > 0:  # resumed: the reference of the run's start, if it had one
            if win_rate:
                self.validation.load_reference(path)
            return
        if data is None or self.trainer.limit_val_batches == 0:
            return
        self._start_validation(reference=path if win_rate else None, when="the validation before the first update")
        with torch.no_grad():
            for batch in data.val_dataloader():
                self.validation.score(batch, self._generate)
        results = self._finish_validation()
        if results:
            self.initial_val_accuracy = results["accuracy"]
            self.initial_val_seconds = self.validation.seconds
            phases.log_before_training(self.trainer, results, self.initial_val_seconds)

    def on_validation_epoch_start(self) -> None:
        self._start_validation()

    def validation_step(self, batch, batch_idx: int) -> None:
        self.validation.score(batch, self._generate)

    def on_validation_epoch_end(self) -> None:
        results = self._finish_validation()  # synchronised across ranks: the same on every rank
        if "accuracy" in results:
            self.log("val/accuracy", results.pop("accuracy"), prog_bar=True, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in results.items()}, sync_dist=True)  # equal on all ranks already

    def configure_callbacks(self) -> list[L.Callback]:
        """The per-iteration record (rollout metrics, ``time/train``, ``time/validation``), whatever the config."""
        return [phases.IterationRecord()]

    def _validation_source(self) -> ValidationSource | None:
        """The datamodule, read only as ``evaluation.ValidationSource`` (its engine, oracle, validation prompts and
        ``val_dataloader()``); None without one."""
        return self.trainer.datamodule if self._trainer is not None else None

    def _engine(self) -> RolloutEngine:
        """Validation samples through the same engine as the rollout (SGLang on GPU), HF generate otherwise."""
        engine = getattr(self._validation_source(), "engine", None)
        return engine if engine is not None else HFEngine()

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int) -> list[list[list[int]]]:
        """``[P][K]`` response ids of the policy for a validation batch. An engine with its own copy of the weights
        reports its log-probs for a pass's first batch, which the datamodule's gap guard checks: that copy is what
        the pass samples from, before any rollout of the iteration has checked it."""
        engine, data = self._engine(), self._validation_source()
        probe = self._gap_probe_due is not None and getattr(engine, "holds_own_weights", False) and data is not None
        when, self._gap_probe_due = self._gap_probe_due, None
        params = replace(params, logprobs=True) if probe else params
        samples = engine.generate(self.policy_handle(), prompt_ids, params, seed=seed)
        if probe and samples.sampler_logprobs is not None:
            data.check_validation_sampler(self, prompt_ids, samples, when)
        return samples.response_ids

    def _start_validation(self, reference: Path | None = None, when: str | None = None) -> None:
        """A validation pass starts; ``when`` names it in the gap guard's message (default: this iteration's)."""
        data = self._validation_source()
        prompts, oracle = getattr(data, "val_prompts", None) or [], getattr(data, "oracle", None)
        self.validation.start(prompts, oracle, self.device, seed=self.current_epoch, reference=reference)
        self._gap_probe_due = when or f"iteration {self.current_epoch}'s validation"

    def _finish_validation(self) -> dict[str, float]:
        self._engine().after_rollout(self.policy_handle())
        return self.validation.finish()

    # ----------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        h = self.hparams
        groups = optim.decay_groups(
            self.named_parameters(), h.weight_decay, h.weight_decay_on, getattr(self, "_param_ndims", None)
        )
        optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=h.learning_rate, betas=h.adam_betas
        )
        self.decay_names = [g["names"] for g in groups]  # [decayed, not decayed], for the record and the tests
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: optim.warmup_factor(k, h.warmup_steps, h.warmup_unit)
        )
        interval = "epoch" if h.warmup_unit == "rollout" else "step"  # one iteration = one epoch = one rollout
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
