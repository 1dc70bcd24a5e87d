"""Rollouts with ``transformers``' ``generate`` on the policy itself: the CPU default, and what tests use.

One batched call per chunk of prompts with ``num_return_sequences=K``, left padding, always with the KV cache
(even when training uses gradient checkpointing), seeded so that an iteration's samples are reproducible. Generation
uses exactly the sampling settings it is given: nothing from the model folder's ``generation_config.json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sppo_lightning.rollout.base import PolicyHandle, RolloutEngine, Samples, SamplingParams, truncate_at_stop


@torch.no_grad()
def hf_generate(
    model,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    pad_id: int,
    eos_id: int,
    batch_size: int,
    with_logprobs: bool = False,
    on_chunk=None,
    sampler_logprobs: bool = False,
):
    """Sample ``params.n`` responses for each prompt with ``model.generate``; returns ``[P][K]`` token ids.

    ``with_logprobs``: also return ``[P][K][T]`` log π(y_t | x, y_<t) of each response token under the model itself
    (temperature 1, before any sampling warper), from the logits generation computed anyway.
    ``on_chunk(sequences_done, tokens_generated)`` is called after each ``generate`` call.
    ``sampler_logprobs`` (without ``with_logprobs``): the same log-probs, recorded step by step by a logits processor
    (``_SampledLogps``: one step's logits kept, not the whole generation's), returned as ``with_logprobs`` does; they
    are the sampler's side of ``rollout/logprob_gap``.
    """
    from transformers import GenerationConfig

    stop = {eos_id, *params.stop_token_ids}
    # These are all the settings generate sees (no_folder_defaults). Sampling fields only when sampling (transformers
    # warns about them under greedy decoding). top_k is always given: HF's default of 50 would silently truncate the
    # distribution; top_k <= 0 means off, which transformers spells 0.
    sampling = (
        {}
        if params.greedy
        else {"temperature": params.temperature, "top_p": params.top_p, "top_k": max(params.top_k, 0)}
    )
    settings = dict(
        do_sample=not params.greedy,
        **sampling,
        max_new_tokens=params.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=sorted(stop),
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=with_logprobs,  # raw logits, before temperature / top-p / top-k
        # On a GPU, generate compiles the model's forward (torch.compile) when it is given a static cache
        # (shared_prompt_cache): a compilation per new batch shape, for a forward that runs a few hundred times.
        disable_compile=True,
    )
    gen_config = GenerationConfig(**settings, num_return_sequences=params.n)
    repeated = GenerationConfig(**settings, num_return_sequences=1)  # for inputs already repeated K times
    # Sharded weights (FSDP) are all-gathered inside every forward, so all ranks must run the same number of
    # forwards: synced_gpus keeps a rank that has finished stepping until every rank has.
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    synced = distributed and dist.get_world_size() > 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    logprobs: list[list[list[float]]] = []
    per_call = max(1, batch_size // params.n)
    recorder = _SampledLogps() if sampler_logprobs and not with_logprobs else None
    # Inference mode (no version counters, no view tracking): 6 to 10 % of a demo rollout, the same tokens and
    # log-probs to the bit; only lists leave this function. Not with a process group: FSDP's all-gathered weights
    # would be made inference tensors here, which training could not write into again.
    try:
        with torch.inference_mode(not distributed):
            for start in range(0, len(prompt_ids), per_call):
                chunk = prompt_ids[start : start + per_call]
                width = max(map(len, chunk))
                input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
                attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                if recorder is not None:
                    recorder.steps, recorder.last = [], None
                extra = {"logits_processor": [recorder]} if recorder is not None else {}
                config = gen_config
                # Every prompt through the model once, not K times, into a cache that holds the whole generation
                # (with K = 1 too: validation's greedy answers).
                if width > 1:
                    extra.update(shared_prompt_cache(model, input_ids, attention_mask, params.n, params.max_new_tokens))
                    input_ids, attention_mask = (
                        t.repeat_interleave(params.n, dim=0) for t in (input_ids, attention_mask)
                    )
                    config = repeated
                with no_folder_defaults(model):
                    gen = model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        generation_config=config,
                        synced_gpus=synced,
                        **extra,
                    )
                new = gen.sequences[:, width:]  # (len(chunk) * K, new_tokens), grouped by prompt
                responses = [truncate_at_stop(r, stop, pad_id) for r in new.tolist()]
                if with_logprobs or recorder is not None:
                    # (len(chunk) * K, new_tokens)
                    token_logps = _token_logps(gen.logits, new) if with_logprobs else recorder.finish(new)
                    per_row = [token_logps[r, : len(ids)].tolist() for r, ids in enumerate(responses)]
                for i in range(len(chunk)):
                    out.append(responses[i * params.n : (i + 1) * params.n])
                    if with_logprobs or recorder is not None:
                        logprobs.append(per_row[i * params.n : (i + 1) * params.n])
                if on_chunk is not None:
                    on_chunk(len(out) * params.n, sum(len(r) for group in out for r in group))
    finally:
        model.train(was_training)
    return (out, logprobs) if with_logprobs or recorder is not None else out


def shared_prompt_cache(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, max_new_tokens: int
) -> dict:
    """``generate``'s keyword for a KV cache of every left-padded prompt but its last token, computed once per prompt
    and repeated for its ``n`` samples (Hugging Face's prefix caching: ``generate`` then runs only the last prompt
    token and the new ones). ``num_return_sequences=n`` would send every prompt through the model n times: on the
    demo that prefill was 45 % of ``generate``'s time.

    The repeated keys and values go into a ``StaticCache`` sized for the whole generation (prompt + ``max_new_tokens``),
    which each step writes into in place: a growing cache concatenates (copies) every layer's keys and values at every
    step, 29 % of a demo rollout's time. Layers that are not plain full attention (sliding windows, linear attention)
    keep the growing cache, which knows their rules.

    The draws are those of the plain call: ``generate`` expands its inputs with the same ``repeat_interleave`` and
    samples from the same rows in the same order; the prompt's keys and values do not depend on the batch, and only
    the logits computed against the cache instead of inside the prompt's forward differ by float rounding (about
    1e-5 in the log-probs; tested against ``num_return_sequences``).
    """
    # The position ids generate derives from a left-padded mask (its _prepare_position_ids_for_generation).
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    out = model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        logits_to_keep=1,  # only the cache is wanted
    )
    # ``cache`` from transformers 5.2x on, ``past_key_values`` before; generate takes the same name
    name = "cache" if "cache" in out else "past_key_values"
    cache = out[name]
    static = _static_copy(model, cache, n, input_ids.shape[1] + max_new_tokens)
    if static is None:
        cache.batch_repeat_interleave(n)  # (P, ...) -> (P * n, ...): each prompt's cache for each of its samples
    return {name: cache if static is None else static}


def _static_copy(model, cache, n: int, max_cache_len: int):
    """A ``StaticCache`` holding each prompt's keys and values ``n`` times, or None where a layer is not plain full
    attention (its growing cache is then kept)."""
    from transformers.cache_utils import DynamicLayer, StaticCache, StaticLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    static = StaticCache(config=model.config, max_cache_len=max_cache_len)
    if len(static.layers) != len(cache.layers) or any(type(layer) is not StaticLayer for layer in static.layers):
        return None
    filled = {"cache_position": torch.arange(cache.get_seq_length(), device=cache.layers[0].keys.device)}
    for i, layer in enumerate(cache.layers):
        static.update(layer.keys.repeat_interleave(n, dim=0), layer.values.repeat_interleave(n, dim=0), i, filled)
    return static


@contextmanager
def no_folder_defaults(model) -> Iterator[None]:
    """Let ``model.generate`` see only the GenerationConfig it is given.

    transformers 5 fills every field that config leaves None from ``model.generation_config`` (the folder's
    ``generation_config.json``: repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_new_tokens, top_k, ...),
    then from its global defaults, which are all neutral except top_k=50 and max_length=20 (both always given here).
    A field cannot be pinned to "off" where off is None (bad_words_ids, suppress_tokens), so the source of the
    merge is replaced by an empty config for the call; the model keeps its own for export.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _token_logps(step_logits: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """log π(token_t) at each generated step, from the per-step logits ``[B, V]`` generate returns."""
    logits = torch.stack(step_logits, dim=1).float()  # (B, steps, V)
    return logits.gather(-1, tokens[:, : logits.shape[1], None]).squeeze(-1) - logits.logsumexp(-1)


class _SampledLogps:
    """A logits processor that records log π(token) of each generated token from the raw logits of its step.

    transformers runs the processors it is given before its sampling warpers (temperature, top-k, top-p:
    ``GenerationMixin._get_logits_processor`` merges them first), so the scores seen here are the model's logits.
    At step t the token drawn at step t − 1 is the last of ``input_ids``; the last step's token is read in
    ``finish``. Only one step's log-softmax is kept: ``[B, V]``, not the whole generation's logits.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = scores.float().log_softmax(-1)
        return scores

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, steps]`` log-probs of ``tokens`` (the generated ids)."""
        if self.last is not None and tokens.shape[1]:
            self.steps.append(self.last.gather(-1, tokens[:, -1:]).squeeze(-1))
        self.last = None
        if not self.steps:
            return torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        return torch.stack(self.steps, dim=1)[:, : tokens.shape[1]]


@dataclass
class HFEngine(RolloutEngine):
    """``generate`` from transformers on the live policy; no second copy of the weights."""

    batch_size: int = 256
    """Sequences (prompts × K) per ``generate`` call."""
    logprobs_from_rollout: bool = False
    """Take log π_t(y|x) from the logits generation computes anyway, instead of a second forward pass over every
    response. It differs from that forward only by float rounding (KV cache, padding side): about 1e-6 in fp32,
    more in bf16. Its logits are kept for a whole ``generate`` call, (steps × batch_size × vocab) floats, so this
    suits small vocabularies or small batches. Only calls that ask (``SamplingParams.logprobs``: the rollout's) get
    them."""

    def generate(self, policy: PolicyHandle, prompt_ids, params, seed) -> Samples:
        # A private RNG stream per iteration: the samples depend on (seed, iteration) only, so a resumed run
        # draws exactly what the uninterrupted one drew, whatever else consumed random numbers before.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            tok = policy.tokenizer
            with_logprobs = self.logprobs_from_rollout and params.logprobs
            out = policy.run(
                lambda: hf_generate(
                    policy.policy,
                    prompt_ids,
                    params,
                    tok.pad_token_id,
                    tok.eos_token_id,
                    self.batch_size,
                    with_logprobs,
                    on_chunk=self.on_progress,
                    sampler_logprobs=params.logprobs,
                )
            )
        if not params.logprobs:
            return Samples(out)
        responses, logprobs = out
        # From generation's own logits π_t needs no second forward, and the sampler's log-probs are π_t's: the gap
        # is 0 by construction. Otherwise π_t comes from the pipeline's forward pass and the gap is the rounding
        # between generation (KV cache, left padding) and that pass.
        return Samples(responses, logprobs if with_logprobs else None, sampler_logprobs=logprobs)
