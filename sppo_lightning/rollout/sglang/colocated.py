"""``sglang.Engine`` inside each training process, sharing its GPU.

Around training, per rollout (or validation pass), in the order released SGLang needs (verl's order too):

1. after a release: resume the weights' memory only (``resume_memory_occupation(tags=["weights"])``);
2. if the weights are stale (a release without CPU backup leaves them undefined; an optimizer step changed the
   policy; a fresh engine holds the base model): push them whole inside a weight-update session
   (``weights.push_weights``);
3. resume the KV cache and CUDA graphs, then flush the cache (prefixes cached with the old weights);
4. generate; afterwards ``after_rollout`` releases everything so training has the GPU.

Every ``(success, message)`` SGLang answers is checked; a refusal stops the run with SGLang's message.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch

from sppo_lightning.errors import ConfigError, UserInputError
from sppo_lightning.rollout.base import PolicyHandle, RolloutEngine, Samples
from sppo_lightning.rollout.sglang import compat
from sppo_lightning.rollout.sglang.requests import (
    RETURN_ORIGINAL_LOGPROB,
    check_result,
    group_outputs,
    output_logprobs,
    per_request_sampling_params,
    repeat_prompts,
)
from sppo_lightning.rollout.sglang.weights import named_full_tensors, push_weights

SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
"""ServerArgs ``dtype`` choices; "auto" = float16 for float32/float16 models, bfloat16 for bfloat16 ones."""
WEIGHTS = "weights"


def torch_dtype(dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype SGLang holds the weights in for a ServerArgs ``dtype`` and a model stored in ``model_dtype``."""
    if dtype == "auto":
        return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16
    return {"half": torch.float16, "float": torch.float32}.get(dtype) or getattr(torch, dtype)


class SGLangEngine(RolloutEngine):
    """``sglang.Engine`` in the training process, sharing its GPU (one engine per training rank)."""

    holds_own_weights = True

    def __init__(
        self,
        mem_fraction_static: float = 0.5,
        tp_size: int = 1,
        dtype: str = "bfloat16",
        bucket_mb: int = 512,
        release_memory: bool = True,
        seed: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        """
        Args:
            mem_fraction_static: Share of GPU memory SGLang takes for weights and KV cache while it is resident.
            tp_size: SGLang tensor-parallel size (GPUs per engine). Only with one training process: every training
                rank runs its own engine on its own GPU.
            dtype: Dtype of SGLang's copy of the weights (ServerArgs ``dtype``: auto, half, float16, bfloat16,
                float, float32); pushed tensors are cast to it.
            bucket_mb: Size of one ``update_weights_from_tensor`` call, in MiB.
            release_memory: Release SGLang's memory while training and resume it for the rollout.
            seed: SGLang's ``random_seed`` is this plus the training rank. None: the run's ``seed_everything``
                seed (0 if none).
            engine_kwargs: Any other ``sglang.Engine`` (ServerArgs) argument, passed through.
        """
        if not 0 < mem_fraction_static < 1:
            raise ConfigError(f"data.engine.init_args.mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
        if bucket_mb < 1:
            raise ConfigError(f"data.engine.init_args.bucket_mb must be >= 1, got {bucket_mb}")
        if tp_size < 1:
            raise ConfigError(f"data.engine.init_args.tp_size must be >= 1, got {tp_size}")
        if dtype not in SGLANG_DTYPES:
            raise ConfigError(f"data.engine.init_args.dtype must be one of {', '.join(SGLANG_DTYPES)}, got {dtype!r}")
        self.mem_fraction_static, self.tp_size, self.dtype = mem_fraction_static, tp_size, dtype
        self.bucket_bytes = bucket_mb * 2**20
        self.release_memory = release_memory
        self.seed = seed
        self.engine_kwargs = dict(engine_kwargs or {})
        self.engine = None
        self._sglang = None
        self._released = False  # memory handed back (after_rollout) and not resumed yet
        self._stale = True  # SGLang's weights differ from the policy's
        self._synced_step: int | None = None
        self._tags: list[str] | None = None
        self._request_seeds = False

    # ------------------------------------------------------------------------------------------------- start
    def check_placement(self, policy: PolicyHandle) -> None:
        """Refuse, before anything starts, what this engine cannot place or feed (one message naming the key)."""
        world = policy.world_size
        if self.tp_size > 1 and world > 1:
            raise ConfigError(
                f"data.engine.init_args.tp_size={self.tp_size} with {world} training processes: every training rank "
                "runs its own engine on its own GPU, so an engine cannot span GPUs that other ranks train on. Use "
                "data.engine.init_args.tp_size=1 (one engine per GPU, as the 7B recipe does), or a separate server "
                "(sppo_lightning.rollout.sglang.SGLangServerEngine) for models that need tensor parallelism."
            )
        if torch.cuda.is_available() and self.tp_size > torch.cuda.device_count():
            raise ConfigError(
                f"data.engine.init_args.tp_size={self.tp_size} needs {self.tp_size} GPUs; "
                f"{torch.cuda.device_count()} are visible"
            )
        if policy.fsdp1:
            raise ConfigError(
                "trainer.strategy=FSDPStrategy (FSDP1) with data.engine=SGLangEngine is not supported: validation "
                "generates inside FSDP1's forward, where the whole weights SGLang needs cannot be gathered. Use "
                "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2; model.fsdp_cpu_offload works with it)."
            )

    def engine_args(self, policy: PolicyHandle) -> dict[str, Any]:
        """ServerArgs of this rank's engine (``tests/rollout/test_sglang_contract.py`` checks the keys)."""
        device = policy.device
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return {
            "model_path": policy.name_or_path,
            "dtype": self.dtype,
            "tp_size": self.tp_size,
            "mem_fraction_static": self.mem_fraction_static,
            "skip_tokenizer_init": True,  # ids in, ids out
            "enable_memory_saver": self.release_memory,  # needed by release/resume_memory_occupation
            "base_gpu_id": device.index if device.type == "cuda" and device.index is not None else 0,
            "random_seed": seed + policy.rank,
            "trust_remote_code": policy.trust_remote_code,
            **self.engine_kwargs,
        }

    def import_sglang(self):
        try:
            import sglang
        except ImportError:
            raise UserInputError(compat.INSTALL_HINT) from None
        return sglang

    def make_engine(self, **kwargs):
        self._sglang = self.import_sglang()
        compat.warn_if_unchecked(self._sglang)
        self._tags = compat.memory_tags(self._sglang)
        self._request_seeds = compat.takes_sampling_seed()
        # log-probs of the untempered policy, as the trainer's π_t (see requests.RETURN_ORIGINAL_LOGPROB); the
        # scheduler processes SGLang starts read it from the environment they inherit
        os.environ[RETURN_ORIGINAL_LOGPROB] = "1"
        return self._sglang.Engine(**kwargs)

    # ----------------------------------------------------------------------------------------------- weights
    def _ready(self, policy: PolicyHandle):
        """Started, resident and holding the current weights (see the module docstring for the order)."""
        if self.engine is None:
            self.check_placement(policy)
            self.engine = self.make_engine(**self.engine_args(policy))
            self._stale, self._released = True, False
        if self._synced_step != policy.step:
            self._stale = True
        if self._released:
            self._stale = True  # without enable_weights_cpu_backup the released weights come back undefined
            if self._tags is None:  # an SGLang without memory tags resumes everything at once
                check_result(self.engine.resume_memory_occupation(), "resume_memory_occupation")
            else:
                check_result(self.engine.resume_memory_occupation(tags=[WEIGHTS]), "resume_memory_occupation")
        if self._stale:
            self.push_weights(policy)
        if self._released and self._tags is not None:
            rest = [t for t in self._tags if t != WEIGHTS]  # KV cache and CUDA graphs, once the weights are in
            check_result(self.engine.resume_memory_occupation(tags=rest), "resume_memory_occupation")
        if self._stale or self._released:
            check_result(self.engine.flush_cache(), "flush_cache")  # prefixes cached with the old weights
        self._released = self._stale = False
        self._synced_step = policy.step
        return self.engine

    def push_weights(self, policy: PolicyHandle) -> None:
        """The policy's whole weights into the engine (a collective under FSDP: every rank pushes to its own)."""
        config = policy.policy.config
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # the checkpoint's dtype
        stored = getattr(torch, stored) if isinstance(stored, str) else stored
        dtype = torch_dtype(self.dtype, stored or next(policy.policy.parameters()).dtype)
        device = policy.device if torch.cuda.is_available() else None
        with policy.full_parameters() if policy.full_parameters is not None else nullcontext():
            push_weights(self.engine, named_full_tensors(policy.policy, dtype, device), self.bucket_bytes)

    # ---------------------------------------------------------------------------------------------- generate
    def generate(self, policy: PolicyHandle, prompt_ids, params, seed) -> Samples:
        engine = self._ready(policy)
        tok = policy.tokenizer
        requests = repeat_prompts(prompt_ids, params.n)
        outputs = engine.generate(
            input_ids=requests,
            sampling_params=per_request_sampling_params(
                params, tok.eos_token_id, len(requests), seed if self._request_seeds else None
            ),
            return_logprob=params.logprobs,  # the sampled tokens' log-probs, for the gap check (not trained on)
        )
        stop = {tok.eos_token_id, *params.stop_token_ids}
        responses = group_outputs(outputs, len(prompt_ids), params.n, stop, tok.pad_token_id)
        return Samples(responses, sampler_logprobs=output_logprobs(outputs, responses) if params.logprobs else None)

    def after_rollout(self, policy: PolicyHandle) -> None:
        if self.release_memory and self.engine is not None and not self._released:
            if self._tags is None:
                check_result(self.engine.release_memory_occupation(), "release_memory_occupation")
            else:
                check_result(self.engine.release_memory_occupation(tags=self._tags), "release_memory_occupation")
            self._released = True
