"""A client of a running SGLang server or router (``python -m sglang.launch_server`` / ``sglang_router``).

Requests carry token ids (the server runs with ``--skip-tokenizer-init``) in the fields of SGLang's
``GenerateReqInput``; weights reach the server through the disk: rank 0 writes the policy as a Hugging Face folder
with the export code (``sppo_lightning.export.save_hf_folder``, as ``callbacks.HFExport`` does) and asks the server to
load it (``/update_weights_from_disk``). Every answer is checked; a refusal stops the run with the server's message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sppo_lightning.errors import ConfigError
from sppo_lightning.rollout.base import PolicyHandle, RolloutEngine, Samples
from sppo_lightning.rollout.sglang.requests import (
    SGLangError,
    check_result,
    group_outputs,
    output_logprobs,
    per_request_sampling_params,
    repeat_prompts,
)
from sppo_lightning.rollout.sglang.retries import post_json


class SGLangServerEngine(RolloutEngine):
    """A client of a running SGLang server or router."""

    holds_own_weights = True

    def __init__(
        self,
        url: str = "http://localhost:30000",
        weights_dir: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 2.0,
        batch_size: int = 512,
        request_seeds: bool = True,
        load_initial_weights: bool = True,
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
            request_seeds: Send a ``sampling_seed`` with every request, derived from the iteration's seed, so a
                server started with ``--enable-deterministic-inference`` samples reproducibly. Turn off for a
                server whose SGLang has no ``sampling_seed``.
            load_initial_weights: Write the starting policy and have the server load it before the first generation,
                so the run never depends on what the server was started with. False trusts that it holds exactly
                ``model.model_name_or_path`` (saves one write and load); a server holding other weights then stops
                the run at the first rollout (``data.logprob_gap_stop``).

        Log-probs: the client asks for the sampled tokens' log-probs (``return_logprob``) to check that the server
        samples from the policy (``rollout/logprob_gap``). Start the server with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``
        when ``data.temperature`` is not 1, or it reports tempered log-probs (see ``requests.RETURN_ORIGINAL_LOGPROB``).
        """
        if retries < 1:
            raise ConfigError(f"data.engine.init_args.retries must be >= 1, got {retries}")
        if batch_size < 1:
            raise ConfigError(f"data.engine.init_args.batch_size must be >= 1, got {batch_size}")
        self.url = url.rstrip("/")
        self.weights_dir = weights_dir
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.request_seeds = request_seeds
        self.load_initial_weights = load_initial_weights
        self._synced_step: int | None = None

    def post(self, path: str, payload: dict) -> Any:
        """POST JSON with retries and exponential backoff; one clear error when the server cannot be reached."""
        return post_json(self.url, path, payload, self.timeout, self.retries, self.backoff)

    def _weights_dir(self, policy: PolicyHandle) -> Path:
        return Path(self.weights_dir) if self.weights_dir is not None else Path(policy.output_dir) / "sglang_weights"

    def refresh_weights(self, policy: PolicyHandle) -> None:
        """Rank 0 writes the policy and the server loads it; every rank waits until it has."""
        from sppo_lightning.export import save_hf_folder

        if policy.full_state_dict is not None:
            state_dict = policy.full_state_dict()  # collective under FSDP
        else:  # an unsharded policy: its own state dict is whole
            state_dict = {k: v.detach().cpu() for k, v in policy.policy.state_dict().items()}
        if policy.is_main:
            folder = save_hf_folder(
                policy.name_or_path, state_dict, policy.tokenizer, self._weights_dir(policy), policy.trust_remote_code
            )
            result = self.post("/update_weights_from_disk", {"model_path": str(folder.resolve())})
            if not isinstance(result, dict) or "success" not in result:
                raise SGLangError(f"SGLang server {self.url}/update_weights_from_disk answered {result!r}")
            check_result(result, f"to load the weights in {folder}")
        policy.barrier("sglang_weights")

    def generate(self, policy: PolicyHandle, prompt_ids, params, seed) -> Samples:
        if self._synced_step != policy.step:
            if policy.step > 0 or self._synced_step is not None or self.load_initial_weights:
                self.refresh_weights(policy)
            self._synced_step = policy.step
        tok = policy.tokenizer
        requests = repeat_prompts(prompt_ids, params.n)
        sampling = per_request_sampling_params(
            params, tok.eos_token_id, len(requests), seed if self.request_seeds else None
        )
        outputs = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            chunk_sampling = sampling[start : start + self.batch_size] if isinstance(sampling, list) else sampling
            body = {"input_ids": chunk, "sampling_params": chunk_sampling}
            if params.logprobs:  # the sampled tokens' log-probs, for the gap check (not trained on)
                body["return_logprob"] = True
            result = self.post("/generate", body)
            if isinstance(result, dict):  # a batch of one comes back as one object
                result = [result]
            if not isinstance(result, list) or len(result) != len(chunk):
                raise SGLangError(
                    f"SGLang server {self.url}/generate answered {type(result).__name__} for {len(chunk)} requests"
                )
            outputs.extend(result)
        stop = {tok.eos_token_id, *params.stop_token_ids}
        responses = group_outputs(outputs, len(prompt_ids), params.n, stop, tok.pad_token_id)
        return Samples(responses, sampler_logprobs=output_logprobs(outputs, responses) if params.logprobs else None)
