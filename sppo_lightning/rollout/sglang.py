"""SGLang rollout engines: colocated in-process ``sglang.Engine``, or a client of a running server/router.

Both send prompts as token ids and read responses back as token ids (``skip_tokenizer_init``: nothing is
re-tokenized), one request per sample (each prompt repeated K times, so samples come back grouped by prompt).

sglang is an optional extra (``pip install "sppo-lightning[sglang]"``), imported only when a colocated engine is
first used; the server client needs nothing beyond the standard library.

Weight refresh. Colocated: before each rollout the policy's parameters are pushed in memory with
``Engine.update_weights_from_tensor``, gathered from FSDP shards one parameter at a time and sent in buckets of
``bucket_mb`` (never a full second copy), then the KV cache is flushed; after the rollout the engine's memory is
released (``release_memory_occupation``) so training has the GPU, and resumed before the next one. Server: rank 0
writes the policy as a Hugging Face folder and asks the server to load it (``/update_weights_from_disk``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from sppo_lightning.errors import ConfigError, UserInputError
from sppo_lightning.rollout.base import RolloutEngine, SamplingParams, truncate_at_stop

INSTALL_HINT = 'SGLang is not installed: pip install "sppo-lightning[sglang]" (CUDA GPUs only)'


# ----------------------------------------------------------------------------------------- request / response
def sglang_sampling_params(params: SamplingParams, eos_id: int) -> dict[str, Any]:
    """Our sampling settings in SGLang's ``sampling_params`` names, one to one (n is handled by repetition)."""
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": sorted({eos_id, *params.stop_token_ids}),
    }


def repeat_prompts(prompt_ids: list[list[int]], n: int) -> list[list[int]]:
    """Each prompt n times in a row: request i belongs to prompt i // n."""
    return [list(p) for p in prompt_ids for _ in range(n)]


def group_outputs(outputs: list[dict], num_prompts: int, n: int, stop: set[int], pad_id: int) -> list[list[list[int]]]:
    """SGLang's per-request outputs (``output_ids`` each) back into ``[P][K]`` response ids."""
    if len(outputs) != num_prompts * n:
        raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {num_prompts * n} requests")
    responses = []
    for out in outputs:
        if "output_ids" not in out:
            raise RuntimeError(f"SGLang output without 'output_ids' (keys: {sorted(out)}); is skip_tokenizer_init on?")
        responses.append(truncate_at_stop(list(out["output_ids"]), stop, pad_id))
    return [responses[i * n : (i + 1) * n] for i in range(num_prompts)]


# ----------------------------------------------------------------------------------------------- weights
def named_full_tensors(policy: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` one parameter at a time; a DTensor shard (FSDP2) is all-gathered here, so every rank
    calls it. FSDP1's flat shards must be gathered around it (``SPPOModule.full_parameters``)."""
    for name, param in policy.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 / DTensor
            tensor = tensor.full_tensor()
        yield name, tensor.to(dtype)


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of at most ``max_bytes`` (a larger tensor travels alone)."""
    current, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            yield current
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    if current:
        yield current


def _is_main(module) -> bool:
    trainer = getattr(module, "_trainer", None)
    return trainer is None or trainer.is_global_zero


def _barrier(module, name: str) -> None:
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        trainer.strategy.barrier(name)


# -------------------------------------------------------------------------------------------- colocated
class SGLangEngine(RolloutEngine):
    """``sglang.Engine`` in the training process, sharing its GPU (one engine per training rank)."""

    def __init__(
        self,
        mem_fraction_static: float = 0.5,
        tp_size: int = 1,
        dtype: str = "bfloat16",
        bucket_mb: int = 512,
        release_memory: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        """
        Args:
            mem_fraction_static: Share of GPU memory SGLang takes for weights and KV cache while it is resident.
            tp_size: SGLang tensor-parallel size (GPUs per engine).
            dtype: Dtype of SGLang's copy of the weights; pushed tensors are cast to it.
            bucket_mb: Size of one ``update_weights_from_tensor`` call, in MiB.
            release_memory: Release SGLang's memory while training and resume it for the rollout.
            engine_kwargs: Any other ``sglang.Engine`` (ServerArgs) argument, passed through.
        """
        if not 0 < mem_fraction_static < 1:
            raise ConfigError(f"data.engine.mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
        if bucket_mb < 1:
            raise ConfigError(f"data.engine.bucket_mb must be >= 1, got {bucket_mb}")
        self.mem_fraction_static, self.tp_size, self.dtype = mem_fraction_static, tp_size, dtype
        self.bucket_bytes = bucket_mb * 2**20
        self.release_memory = release_memory
        self.engine_kwargs = dict(engine_kwargs or {})
        self.engine = None
        self._released = False
        self._synced_step: int | None = None

    def engine_args(self, module) -> dict[str, Any]:
        trainer = getattr(module, "_trainer", None)
        return {
            "model_path": module.hparams.model_name_or_path,
            "dtype": self.dtype,
            "tp_size": self.tp_size,
            "mem_fraction_static": self.mem_fraction_static,
            "skip_tokenizer_init": True,  # ids in, ids out
            "enable_memory_saver": self.release_memory,  # needed by release/resume_memory_occupation
            "base_gpu_id": trainer.local_rank * self.tp_size if trainer is not None else 0,
            "trust_remote_code": module.hparams.trust_remote_code,
            **self.engine_kwargs,
        }

    def make_engine(self, **kwargs):
        try:
            import sglang
        except ImportError:
            raise UserInputError(INSTALL_HINT) from None
        return sglang.Engine(**kwargs)

    def _ready(self, module):
        """Started, resident and holding the current weights."""
        if self.engine is None:
            self.engine = self.make_engine(**self.engine_args(module))
        if self._released:
            self.engine.resume_memory_occupation()
            self._released = False
        if self._synced_step != module.global_step:  # weights changed since the last push (or never pushed)
            self.push_weights(module)
            self._synced_step = module.global_step
        return self.engine

    def push_weights(self, module) -> None:
        dtype = getattr(torch, self.dtype)
        with module.full_parameters():
            for bucket in buckets(named_full_tensors(module.policy, dtype), self.bucket_bytes):
                self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
        self.engine.flush_cache()  # cached prefixes were computed with the old weights

    def generate(self, module, prompt_ids, params, seed):
        engine = self._ready(module)
        tok = module.tokenizer
        outputs = engine.generate(
            input_ids=repeat_prompts(prompt_ids, params.n),
            sampling_params=sglang_sampling_params(params, tok.eos_token_id),
        )
        stop = {tok.eos_token_id, *params.stop_token_ids}
        return group_outputs(outputs, len(prompt_ids), params.n, stop, tok.pad_token_id)

    def after_rollout(self, module) -> None:
        if self.release_memory and self.engine is not None and not self._released:
            self.engine.release_memory_occupation()
            self._released = True


# ----------------------------------------------------------------------------------------------- server
class SGLangServerEngine(RolloutEngine):
    """A client of a running SGLang server or router (``python -m sglang.launch_server`` / ``sglang_router``)."""

    def __init__(
        self,
        url: str = "http://localhost:30000",
        weights_dir: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 2.0,
        batch_size: int = 512,
    ):
        """
        Args:
            url: Base URL of the server or router.
            weights_dir: Where the trainer writes the policy for the server to load each iteration (a path the
                server can read). None: ``<default_root_dir>/sglang_weights``.
            timeout: Seconds per HTTP request.
            retries: Attempts per request before giving up (connection errors, 5xx, timeouts).
            backoff: First wait between attempts in seconds, doubled after each failure.
            batch_size: Requests (prompts × K) per ``/generate`` call.
        """
        if retries < 1:
            raise ConfigError(f"data.engine.retries must be >= 1, got {retries}")
        self.url = url.rstrip("/")
        self.weights_dir = weights_dir
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self._synced_step: int | None = None

    def post(self, path: str, payload: dict) -> Any:
        """POST JSON with retries and exponential backoff; one clear error when the server cannot be reached."""
        data = json.dumps(payload).encode()
        wait, last = self.backoff, None
        for attempt in range(1, self.retries + 1):
            request = urllib.request.Request(
                self.url + path, data=data, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as e:
                if e.code < 500:  # the request itself is wrong: retrying will not help
                    detail = e.read().decode(errors="replace")[:500]
                    raise RuntimeError(
                        f"SGLang server {self.url}{path} refused the request ({e.code}): {detail}"
                    ) from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < self.retries:
                time.sleep(wait)
                wait *= 2
        raise UserInputError(
            f"SGLang server at {self.url} unreachable ({path}) after {self.retries} attempts: {last}. "
            "Is it running (python -m sglang.launch_server --model-path ... --skip-tokenizer-init)? "
            "Check data.engine.init_args.url."
        )

    def _weights_dir(self, module) -> Path:
        if self.weights_dir is not None:
            return Path(self.weights_dir)
        trainer = getattr(module, "_trainer", None)
        return Path(trainer.default_root_dir if trainer is not None else ".") / "sglang_weights"

    def refresh_weights(self, module) -> None:
        """Rank 0 writes the policy and the server loads it; every rank waits until it has."""
        from sppo_lightning.export import save_hf_folder

        state_dict = module.full_policy_state_dict()  # collective under FSDP
        if _is_main(module):
            h = module.hparams
            folder = save_hf_folder(
                h.model_name_or_path, state_dict, module.tokenizer, self._weights_dir(module), h.trust_remote_code
            )
            result = self.post("/update_weights_from_disk", {"model_path": str(folder.resolve())})
            if isinstance(result, dict) and result.get("success") is False:
                raise RuntimeError(f"SGLang server could not load {folder}: {result.get('message')}")
        _barrier(module, "sglang_weights")

    def generate(self, module, prompt_ids, params, seed):
        if self._synced_step != module.global_step:
            if module.global_step > 0 or self._synced_step is not None:  # the server starts from the base weights
                self.refresh_weights(module)
            self._synced_step = module.global_step
        tok = module.tokenizer
        requests = repeat_prompts(prompt_ids, params.n)
        sampling = sglang_sampling_params(params, tok.eos_token_id)
        outputs = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            result = self.post("/generate", {"input_ids": chunk, "sampling_params": sampling})
            outputs.extend(result if isinstance(result, list) else [result])
        stop = {tok.eos_token_id, *params.stop_token_ids}
        return group_outputs(outputs, len(prompt_ids), params.n, stop, tok.pad_token_id)
