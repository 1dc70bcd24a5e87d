"""What is sent to SGLang and how its answers are read: sampling settings, one request per sample, outputs back in
``[P][K]`` order, and the ``(success, message)`` results of its control calls.

The names follow SGLang's ``SamplingParams`` (``srt/sampling/sampling_params.py``) and ``GenerateReqInput``
(``srt/managers/io_struct.py``); ``tests/rollout/test_sglang_contract.py`` checks them against the released source.
"""

from __future__ import annotations

from typing import Any

from sppo_lightning.rollout.base import SamplingParams, truncate_at_stop


class SGLangError(RuntimeError):
    """SGLang refused a call or answered something we cannot use; the run stops with this message."""


def sglang_sampling_params(params: SamplingParams, eos_id: int) -> dict[str, Any]:
    """Our sampling settings in SGLang's ``sampling_params`` names (n is handled by repetition).

    SGLang accepts ``top_k`` of -1 (off) or >= 1 and rejects 0; here, as in the HF engine, any ``top_k <= 0`` is off.
    """
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        # stated, not left to the server: a server started with --preferred-sampling-params merges its own values
        # under ours, and draws must come from π_t itself (as the HF engine ignores generation_config.json)
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": sorted({eos_id, *params.stop_token_ids}),
    }


def request_seed(seed: int, index: int) -> int:
    """The ``sampling_seed`` of request ``index`` of a call made with ``seed``: distinct per request (the K copies of
    a prompt must not draw the same sample), a function of (seed, index) only, inside SGLang's int64 range."""
    return (seed * 1_000_003 + index) % 2**63


def per_request_sampling_params(
    params: SamplingParams, eos_id: int, num_requests: int, seed: int | None
) -> dict[str, Any] | list[dict[str, Any]]:
    """One ``sampling_params`` dict for every request, or one per request carrying its own ``sampling_seed`` when
    ``seed`` is given (the installed SGLang takes per-request seeds)."""
    common = sglang_sampling_params(params, eos_id)
    if seed is None:
        return common
    return [{**common, "sampling_seed": request_seed(seed, i)} for i in range(num_requests)]


def repeat_prompts(prompt_ids: list[list[int]], n: int) -> list[list[int]]:
    """Each prompt n times in a row: request i belongs to prompt i // n."""
    return [list(p) for p in prompt_ids for _ in range(n)]


def group_outputs(outputs: list[dict], num_prompts: int, n: int, stop: set[int], pad_id: int) -> list[list[list[int]]]:
    """SGLang's per-request outputs (``output_ids`` each, stop token included) back into ``[P][K]`` response ids.

    An aborted request (``meta_info.finish_reason.type == "abort"``) stops the run with SGLang's reason: its
    ``output_ids`` are whatever was generated before the abort, not a sample of the policy.
    """
    if isinstance(outputs, dict):  # a single request comes back as one dict
        outputs = [outputs]
    if len(outputs) != num_prompts * n:
        raise SGLangError(f"SGLang returned {len(outputs)} outputs for {num_prompts * n} requests")
    responses = []
    for out in outputs:
        if "output_ids" not in out:
            raise SGLangError(f"SGLang output without 'output_ids' (keys: {sorted(out)}); is skip_tokenizer_init on?")
        finish = (out.get("meta_info") or {}).get("finish_reason") or {}
        if isinstance(finish, dict) and finish.get("type") == "abort":
            raise SGLangError(f"SGLang aborted a request: {finish.get('message', finish)}")
        responses.append(truncate_at_stop(list(out["output_ids"]), stop, pad_id))
    return [responses[i * n : (i + 1) * n] for i in range(num_prompts)]


# Which log-probs SGLang returns (sglang 0.5.23, srt/layers/sampler.py): ``return_logprob`` gives, per output token,
# ``log softmax(logits / temperature)`` in the standard sampling path (:275 divides the logits in place, :309-315
# take ``log(probs)`` of that softmax), i.e. after temperature but before top-k/top-p renormalisation
# (``_sample_from_probs``, :362, renormalises a copy); greedy requests get ``log_softmax(logits)`` (:219-223).
# With the environment variable SGLANG_RETURN_ORIGINAL_LOGPROB=1 (:82, read when the module is imported; also
# srt/layers/logprob_processor.py:417) they are ``log_softmax(logits)`` before temperature (:230-237, :322-323).
# The trainer's π_t log-probs are those of the untempered policy (logprobs.py), so like is compared with like by
# asking SGLang for the original ones: the colocated engine sets the variable before SGLang starts its scheduler
# (which inherits the environment); a server must be started with it when data.temperature != 1 (at temperature 1
# both are the same numbers). Computing the trainer's side at the sampling temperature instead would need the
# full logits of a second pass: the π_t pass keeps only the sampled tokens' log-probs.
RETURN_ORIGINAL_LOGPROB = "SGLANG_RETURN_ORIGINAL_LOGPROB"


def output_logprobs(outputs: list[dict], responses: list[list[list[int]]]) -> list[list[list[float]]]:
    """The log-probs SGLang reported for each response's tokens, ``[P][K][T]`` like ``responses``.

    sglang 0.5.23 returns them in ``meta_info["output_token_logprobs"]`` as ``(logprob, token_id, text)`` per output
    token (``TokenizerManager.detokenize_logprob_tokens``, srt/managers/tokenizer_manager.py:3098; text is None
    without ``return_text_in_logprobs``; lists over HTTP), in ``output_ids`` order, stop token included.
    """
    if isinstance(outputs, dict):
        outputs = [outputs]
    flat = [r for group in responses for r in group]
    out = []
    for request, (output, ids) in enumerate(zip(outputs, flat, strict=True)):
        entries = (output.get("meta_info") or {}).get("output_token_logprobs")
        if entries is None:
            raise SGLangError(
                f"SGLang output {request} has no meta_info.output_token_logprobs although return_logprob was asked"
            )
        if len(entries) < len(ids) or any(int(e[1]) != t for e, t in zip(entries, ids, strict=False)):
            raise SGLangError(f"SGLang output {request}: output_token_logprobs do not match its output_ids")
        out.append([float(e[0]) for e in entries[: len(ids)]])
    n = len(responses[0]) if responses else 0
    return [out[i * n : (i + 1) * n] for i in range(len(responses))]


def check_result(result: Any, call: str) -> None:
    """Stop with SGLang's message when ``call`` was refused.

    SGLang answers its control calls with ``(success, message)`` (weight updates, weight-update sessions), an object
    with ``success``/``message`` (``flush_cache``), a dict of them (HTTP), or nothing (memory release/resume).
    """
    if result is None:
        return
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        success, message = result[0], result[1] if len(result) > 1 else ""
    elif isinstance(result, dict) and "success" in result:
        success, message = result["success"], result.get("message", "")
    elif hasattr(result, "success"):
        success, message = result.success, getattr(result, "message", "")
    else:
        return
    if success is not True:
        raise SGLangError(f"SGLang refused {call}: {message or 'no message'}")
