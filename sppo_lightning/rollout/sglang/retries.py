"""JSON over HTTP to an SGLang server or router, with retries and exponential backoff."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from sppo_lightning.errors import UserInputError
from sppo_lightning.rollout.sglang.requests import SGLangError


def post_json(url: str, path: str, payload: dict, timeout: float, retries: int, backoff: float) -> Any:
    """POST ``payload`` to ``url + path`` and return the decoded answer.

    Connection errors, timeouts and 5xx answers are retried ``retries`` times in all, waiting ``backoff`` seconds and
    doubling; a 4xx answer (the request itself is wrong, retrying will not help) stops at once with the server's
    message. A server that stays unreachable gives one error naming ``data.engine.init_args.url``.
    """
    data = json.dumps(payload).encode()
    wait, last = backoff, None
    for attempt in range(1, retries + 1):
        request = urllib.request.Request(
            url + path, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code < 500:
                detail = e.read().decode(errors="replace")[:500]
                raise SGLangError(f"SGLang server {url}{path} refused the request ({e.code}): {detail}") from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = str(getattr(e, "reason", e))
        if attempt < retries:
            time.sleep(wait)
            wait *= 2
    raise UserInputError(
        f"SGLang server at {url} unreachable ({path}) after {retries} attempts: {last}. "
        "Is it running (python -m sglang.launch_server --model-path ... --skip-tokenizer-init)? "
        "Check data.engine.init_args.url."
    )
