"""A stateful stand-in for ``sglang.Engine``, behaving as the released one does for the calls a trainer makes.

Its interface is read from the released source (``sglang_source``): ServerArgs keywords, memory tags, sampling
fields, the refusal outside a weight-update session. Its behaviour follows that source:

- ``Engine(**kwargs)``: a keyword that is no ServerArgs field is a ``TypeError`` (ServerArgs is a msgspec.Struct);
  ``dtype`` must be one of the field's choices; "auto" holds float32/float16 models in float16.
- ``update_weights_from_tensor`` outside ``begin_weight_update()``/``end_weight_update()`` answers
  ``(False, message)`` and changes nothing (``scheduler_components/weight_updater.py``, since 0.5.21); names the
  model does not have are skipped without a word, as SGLang's loaders do.
- ``release_memory_occupation`` (no tags: weights, KV cache and CUDA graphs) with the memory saver on leaves the
  weights undefined unless ``enable_weights_cpu_backup`` (here: overwritten with noise); resuming a kind that is not
  released raises ``KeyError`` (the scheduler removes it from a set); generating while anything is released
  fails (SGLang would read freed memory); writing weights while they are released fails.
- ``generate``: each request's ``sampling_params`` is built like SGLang's ``SamplingParams`` (unknown key:
  ``TypeError``; temperature 0 means top_k 1; top_k -1 means the whole vocabulary) and verified as its ``verify``
  does (top_k 0 is refused); the answer is ``{"output_ids", "meta_info"}`` per request, the stop token included.
  With ``return_logprob``, ``meta_info["output_token_logprobs"]`` holds ``(logprob, token_id, None)`` per output
  token (``TokenizerManager.detokenize_logprob_tokens``), computed from the logits of the weights the engine holds as
  ``srt/layers/sampler.py`` does: ``log_softmax(logits)`` for greedy requests or under
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (read when the engine starts, as the scheduler reads it at import),
  ``log_softmax(logits / temperature)`` otherwise, before top-k/top-p.
  Tokens are sampled from the weights the engine holds (transformers on CPU, float32 compute on weights rounded
  to the engine's dtype), with the engine's ``random_seed``, or per request ``sampling_seed`` under
  ``enable_deterministic_inference`` (``srt/sampling/sampling_batch_info.py``).

Every call is recorded (method, keywords) so the contract tests can check what the trainer really called.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import types
import uuid
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tests.rollout.sglang_source import ReleasedSGLang

TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary"


@dataclass
class Call:
    """One call the trainer made: the method, its positional and its keyword arguments."""

    name: str
    args: tuple
    kwargs: dict


def traced(method):
    """Record every call of ``method`` on ``self.calls`` before running it."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self.calls.append(Call(method.__name__, args, kwargs))
        return method(self, *args, **kwargs)

    return wrapper


class StandInSamplingParams:
    """SGLang's per-request sampling settings: defaults, normalisation and verification (see the module doc)."""

    FIELDS: tuple[str, ...] = ()  # set from the released source

    def __init__(self, **given):
        unknown = sorted(set(given) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"Unexpected keyword argument '{unknown[0]}'")
        self.max_new_tokens = given.get("max_new_tokens", 128)
        self.stop_token_ids = {int(t) for t in given.get("stop_token_ids") or () if t is not None}
        self.temperature = given.get("temperature", 1.0)
        self.top_p = given.get("top_p", 1.0)
        self.top_k = given.get("top_k", TOP_K_ALL)
        self.min_p = given.get("min_p", 0.0)
        self.sampling_seed = given.get("sampling_seed")
        self.temperature = 1.0 if self.temperature is None else self.temperature
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.top_k = -1 if self.top_k is None else self.top_k
        if 0 <= self.temperature < 1e-6:  # greedy: SGLang keeps temperature 1 and the single best token
            self.temperature, self.top_k = 1.0, 1
        if self.top_k == -1:
            self.top_k = TOP_K_ALL

    def verify(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if self.sampling_seed is not None and (
            not isinstance(self.sampling_seed, int) or not -(2**63) <= self.sampling_seed < 2**63
        ):
            raise ValueError(f"sampling_seed must be an int64, got {self.sampling_seed!r}.")


class StandInEngine:
    """``sglang.Engine`` as the trainer sees it (bind to a release with ``for_release``)."""

    release: ReleasedSGLang  # set by for_release
    instances: list[StandInEngine] = []  # every engine started, in order (reset by for_release)

    @classmethod
    def for_release(cls, release: ReleasedSGLang, sessions: bool = True) -> type[StandInEngine]:
        base = cls if sessions else _WithoutSessions
        sampling = type("SamplingParams", (StandInSamplingParams,), {"FIELDS": release.sampling_params_fields})
        return type(
            f"StandInEngine_{release.version}", (base,), {"release": release, "instances": [], "Sampling": sampling}
        )

    def __init__(self, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.calls: list[Call] = [Call("__init__", (), dict(kwargs))]
        type(self).instances.append(self)
        unknown = sorted(set(kwargs) - self.release.server_args_fields)
        if unknown:
            raise TypeError(f"Unexpected keyword argument '{unknown[0]}'")
        self.args = kwargs
        dtype = kwargs.get("dtype", "auto")
        if dtype not in self.release.dtype_choices:
            raise ValueError(f"dtype {dtype!r} not in {self.release.dtype_choices}")
        config = AutoConfig.from_pretrained(kwargs["model_path"])
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        stored = getattr(torch, stored) if isinstance(stored, str) else stored
        if dtype == "auto":
            self.dtype = torch.bfloat16 if stored == torch.bfloat16 else torch.float16
        else:
            self.dtype = {"half": torch.float16, "float": torch.float32}.get(dtype) or getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model_path"], dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())
        with torch.no_grad():
            for p in self.params.values():  # the engine's copy is rounded to its dtype
                p.copy_(p.to(self.dtype).float())
        self.eos = config.eos_token_id
        self.memory_saver = bool(kwargs.get("enable_memory_saver", False))
        self.cpu_backup = bool(kwargs.get("enable_weights_cpu_backup", False))
        self.deterministic = bool(kwargs.get("enable_deterministic_inference", False))
        self.original_logprob = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes")
        seed = kwargs.get("random_seed")
        self.rng = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        self.offload_tags: set[str] = set()
        self._backup: dict[str, torch.Tensor] | None = None
        self.session: dict | None = None
        self.loaded: dict[str, torch.Tensor] = {}  # the tensors of the last update, by name, as received
        self.skipped: set[str] = set()  # names SGLang's loader would drop without a word (kept here for the tests)

    # -------------------------------------------------------------------------------------------- weights
    @traced
    def begin_weight_update(self, selector: str = "all"):
        if self.session is not None:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session = {"selector": selector}
        return True, "Success"

    @traced
    def end_weight_update(self):
        if self.session is None:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session = None
        return True, "Success"

    def _session_open(self) -> bool:
        return self.session is not None

    @traced
    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        if not self._session_open():
            return False, self.release.session_refusal
        if "weights" in self.offload_tags:
            raise RuntimeError("CUDA error: an illegal memory access (weights written while released)")
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name in self.params:  # SGLang's loaders skip names they do not know, silently
                    self.params[name].copy_(tensor.detach().to(self.dtype).float())
                    self.loaded[name] = tensor.detach().clone()
                else:
                    self.skipped.add(name)
        return True, "Success"  # (flush_cache=True would flush here; nothing is cached between calls)

    @traced
    def flush_cache(self):
        return SimpleNamespace(success=True, message="")

    # --------------------------------------------------------------------------------------------- memory
    @traced
    def release_memory_occupation(self, tags=None):
        tags = list(tags) if tags else list(self.release.memory_tags)
        self.offload_tags.update(tags)
        if "weights" in tags and self.memory_saver:
            if self.cpu_backup:
                self._backup = {n: p.detach().clone() for n, p in self.params.items()}
            with torch.no_grad():  # the memory is handed back: what comes back is undefined
                noise = torch.Generator().manual_seed(1234)
                for p in self.params.values():
                    p.copy_(torch.randn(p.shape, generator=noise))

    @traced
    def resume_memory_occupation(self, tags=None):
        tags = list(tags) if tags else list(self.release.memory_tags)
        for tag in tags:
            self.offload_tags.remove(tag)  # KeyError for a kind that was not released, as in SGLang
        if "weights" in tags and self._backup is not None:
            with torch.no_grad():
                for name, value in self._backup.items():
                    self.params[name].copy_(value)
            self._backup = None

    # ------------------------------------------------------------------------------------------- generate
    @traced
    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False, stream=False):
        if self.offload_tags:
            raise RuntimeError(f"generate while {sorted(self.offload_tags)} released: SGLang would read freed memory")
        if prompt is not None or input_ids is None:
            raise ValueError("this stand-in takes input_ids only (skip_tokenizer_init)")
        single = bool(input_ids) and isinstance(input_ids[0], int)
        requests = [input_ids] if single else input_ids
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(requests):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(requests)} requests")
            given = sampling_params
        else:
            given = [sampling_params or {}] * len(requests)
        settings = [self.Sampling(**sp) for sp in given]
        for s in settings:
            s.verify()
        outputs = self._sample(requests, settings, bool(return_logprob))
        return outputs[0] if single else outputs

    @torch.no_grad()
    def _sample(
        self, requests: list[list[int]], settings: list[StandInSamplingParams], return_logprob: bool = False
    ) -> list[dict]:
        B, width = len(requests), max(map(len, requests))
        ids = torch.tensor([[0] * (width - len(r)) + list(r) for r in requests])  # left padded, (B, width)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in requests])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        rngs = [
            torch.Generator().manual_seed(s.sampling_seed if s.sampling_seed is not None else 42)
            if self.deterministic
            else self.rng
            for s in settings
        ]
        generated: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        finish: list[dict | None] = [None] * B
        for _ in range(max(s.max_new_tokens for s in settings)):
            logits = out.logits[:, -1].float()  # (B, V)
            step = []
            for b in range(B):
                if finish[b] is not None:
                    step.append(0)
                    continue
                token = self._pick(logits[b], settings[b], rngs[b])
                generated[b].append(token)
                if return_logprob:
                    logprobs[b].append(self._logprob(logits[b], settings[b], token))
                stops = settings[b].stop_token_ids | ({self.eos} if isinstance(self.eos, int) else set(self.eos or ()))
                if token in stops:
                    finish[b] = {"type": "stop", "matched": token}
                elif len(generated[b]) >= settings[b].max_new_tokens:
                    finish[b] = {"type": "length", "length": len(generated[b])}
                step.append(token)
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=torch.tensor(step)[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return [
            {
                "output_ids": generated[b],
                "meta_info": {
                    "id": uuid.uuid4().hex,
                    "finish_reason": finish[b] or {"type": "length", "length": len(generated[b])},
                    "prompt_tokens": len(requests[b]),
                    "completion_tokens": len(generated[b]),
                    "cached_tokens": 0,
                    **({"output_token_logprobs": list(zip(logprobs[b], generated[b], [None] * len(generated[b]),
                                                            strict=True))} if return_logprob else {}),
                },
            }
            for b in range(B)
        ]  # fmt: skip

    def _logprob(self, logits: torch.Tensor, s: StandInSamplingParams, token: int) -> float:
        """The log-prob SGLang reports for ``token`` (see the module doc): before temperature when greedy or asked
        for the original, else after it; never after top-k/top-p."""
        scale = 1.0 if s.top_k == 1 or self.original_logprob else s.temperature
        return float(torch.log_softmax(logits / scale, dim=-1)[token])

    @staticmethod
    def _pick(logits: torch.Tensor, s: StandInSamplingParams, rng: torch.Generator) -> int:
        if s.top_k == 1:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_k < probs.numel():
            kth = probs.topk(s.top_k).values[-1]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
            sorted_probs[before > s.top_p * sorted_probs.sum()] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=rng))


class _WithoutSessions(StandInEngine):
    """An SGLang from before weight-update sessions (< 0.5.21): no session methods, pushes accepted directly."""

    def __getattribute__(self, name):
        if name in ("begin_weight_update", "end_weight_update"):
            raise AttributeError(name)
        return super().__getattribute__(name)

    def _session_open(self) -> bool:
        return True


def modules(release: ReleasedSGLang, sessions: bool = True, version: str | None = None) -> dict[str, types.ModuleType]:
    """The modules ``import sglang`` needs to give the stand-in: ``sglang.Engine``, ``__version__``, the memory tags
    and the ``SamplingParams`` fields of ``release``."""
    engine_cls = StandInEngine.for_release(release, sessions=sessions)
    sampling_cls = type(
        "SamplingParams",
        (),
        {
            "__struct_fields__": release.sampling_params_fields,
            "__signature__": inspect.Signature(
                [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY) for f in release.sampling_params_fields]
            ),
        },
    )
    srt = ["sglang.srt", "sglang.srt.constants", "sglang.srt.sampling", "sglang.srt.sampling.sampling_params"]
    mods = {name: types.ModuleType(name) for name in ["sglang", *srt]}
    mods["sglang"].Engine = engine_cls
    mods["sglang"].__version__ = version or release.version
    mods["sglang"].srt = mods["sglang.srt"]
    mods["sglang.srt"].constants = mods["sglang.srt.constants"]
    mods["sglang.srt"].sampling = mods["sglang.srt.sampling"]
    mods["sglang.srt.constants"].GPU_MEMORY_ALL_TYPES = list(release.memory_tags)
    mods["sglang.srt.sampling"].sampling_params = mods["sglang.srt.sampling.sampling_params"]
    mods["sglang.srt.sampling.sampling_params"].SamplingParams = sampling_cls
    return mods


def install(monkeypatch, release: ReleasedSGLang, sessions: bool = True, version: str | None = None):
    """Make ``import sglang`` give the stand-in of ``release`` in this process; returns the stand-in engine class."""
    mods = modules(release, sessions, version)
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    return mods["sglang"].Engine
