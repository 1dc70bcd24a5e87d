"""SGLang rollout engines: colocated in-process ``sglang.Engine``, or a client of a running server/router.

Both send prompts as token ids and read responses back as token ids (``skip_tokenizer_init``: nothing is
re-tokenized), one request per sample (each prompt repeated K times, so samples come back grouped by prompt).
sglang is an optional extra (``pip install "sppo-lightning[sglang]"``), imported only when a colocated engine is
first used; the server client needs nothing beyond the standard library.

One concern a module:

- ``colocated``: ``SGLangEngine``, the engine's life around training (start, resume, refresh, release);
- ``weights``: whole weights out of (FSDP) shards, in buckets, inside a weight-update session;
- ``requests``: sampling settings, requests and outputs, SGLang's ``(success, message)`` answers;
- ``server`` and ``retries``: ``SGLangServerEngine`` and its HTTP calls;
- ``compat``: the checked SGLang versions and what the installed one offers.
"""

from sppo_lightning.rollout.sglang.colocated import SGLangEngine
from sppo_lightning.rollout.sglang.compat import CHECKED, INSTALL_HINT
from sppo_lightning.rollout.sglang.requests import (
    SGLangError,
    check_result,
    group_outputs,
    repeat_prompts,
    sglang_sampling_params,
)
from sppo_lightning.rollout.sglang.server import SGLangServerEngine
from sppo_lightning.rollout.sglang.weights import buckets, named_full_tensors, push_weights

__all__ = [
    "CHECKED",
    "INSTALL_HINT",
    "SGLangEngine",
    "SGLangError",
    "SGLangServerEngine",
    "buckets",
    "check_result",
    "group_outputs",
    "named_full_tensors",
    "push_weights",
    "repeat_prompts",
    "sglang_sampling_params",
]
