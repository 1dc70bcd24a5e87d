"""log π(y_t | x, y_<t) of every response token. Their sum over a response is log π(y|x), the quantity every SPPO
loss regresses (log π_θ(y|x) − log π_t(y|x)); the per-token values are what the trust region (``clip_ratio``) reads.

All three functions return ``[B, R]``, response-aligned: column j is the j-th token of each row's response, R the
longest response, 0 past a response's end. Three ways to the same numbers. ``response_token_logps`` runs every row,
prompt and response, through the model, right-padded. ``packed_token_logps`` lays the rows end to end in one
sequence with no padding, attention confined to each row. ``shared_prompt_token_logps`` runs each distinct prompt
once and lets the rows that share it (the K responses of a group) continue from its KV cache: a group then costs
P + K·R tokens instead of K·(P + R), so with 32-token prompts and 10-token responses, K = 4 sends 72 tokens through
the model instead of 168. Causal attention makes them equal up to float rounding, gradients included: the prompt's
keys and values receive the gradient of every row that reads them, as the repeated prompt positions of the plain
forward do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from sppo_lightning import attention
from sppo_lightning.health import entropy_sums

# Where ``_token_logps`` adds the entropy sums of the logits it sees, while ``collecting_entropy`` is active (the
# training step's forward): ``train/entropy`` from the logits the step computes anyway, without a second forward
# and without changing the three functions' signatures.
_ENTROPY: ContextVar[list | None] = ContextVar("sppo_entropy", default=None)


@contextmanager
def collecting_entropy() -> Iterator[list[torch.Tensor]]:
    """Within the context, every log-prob computation appends ``health.entropy_sums`` (Σ entropy, tokens) of its
    response tokens to the yielded list (no gradient, a chunk of logits at a time)."""
    sink: list[torch.Tensor] = []
    token = _ENTROPY.set(sink)
    try:
        yield sink
    finally:
        _ENTROPY.reset(token)


def _token_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask · log softmax(logits_t)[target_t]: ``[B, T, V], [B, T], [B, T] -> [B, T]``, without materialising the
    full log-probabilities."""
    sink = _ENTROPY.get()
    if sink is not None:
        sink.append(entropy_sums(logits, mask))
    logits = logits.float()
    return (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)) * mask


def _response_columns(response_mask: torch.Tensor, at_least: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The response-aligned layout ``[B, R]`` the functions return: column indices ``[1, R]`` and which columns of
    each row hold a response token (R = the longest response, or ``at_least``)."""
    lengths = response_mask.sum(1).long()
    cols = torch.arange(max(int(lengths.max()), at_least), device=response_mask.device)[None, :]
    return cols, cols < lengths[:, None]


def response_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """log π(y_t | x, y_<t) of each response token: ``[B, T] -> [B, R]``, response-aligned.

    Logits at position t predict token t+1, hence the shift; prompt and padding tokens are masked out. The head is
    applied only from the first position that predicts a response token on: prompts are often most of a sequence
    (1,024 of 1,536 tokens in the MATH recipe), and their (B, T, vocab) logits would dominate memory.
    """
    has_response = response_mask.any(dim=1)
    first = int(response_mask[has_response].argmax(dim=1).min()) if has_response.any() else 1
    start = max(first - 1, 0)  # the position whose logits predict the first response token
    width = input_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=width - start)
    # logits of positions start .. T-2 predict the tokens start+1 .. T-1
    by_position = _token_logps(out.logits[:, :-1], input_ids[:, start + 1 :], response_mask[:, start + 1 :])
    # Rows' responses start at different positions (prompts differ in length): shift each to column 0.
    cols, valid = _response_columns(response_mask)
    first_col = response_mask.argmax(dim=1)[:, None] - (start + 1)
    return by_position.gather(1, (first_col + cols).clamp(0, by_position.shape[1] - 1)) * valid


def shared_prompt_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
) -> torch.Tensor:
    """``response_token_logps`` for rows laid out as ``collate`` does (prompt + response, right-padded, the first
    ``prompt_lengths`` tokens of a row being its prompt): each distinct prompt goes through the model once,
    left-padded so that its last token ends every row, and its KV cache is selected for each of the rows that
    share it before the responses go through. It takes these two forwards whatever the data (no prompt repeating,
    no response token), so that ranks stepping together under FSDP run the same forwards; with one sample per
    prompt (the MATH recipe) there is nothing to share: use ``response_token_logps``.

    Needs a model whose forward returns and accepts a KV cache with gradients (any Hugging Face decoder without
    gradient checkpointing, which turns the cache off in training).
    """
    device, width = input_ids.device, input_ids.shape[1]
    p_width = int(prompt_lengths.max())

    def left_padding(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position ids, attention mask) of prompts left-padded to ``p_width``."""
        pos = torch.arange(p_width, device=device)[None, :] - (p_width - lengths)[:, None]  # < 0 on the padding
        return pos.clamp(min=0), (pos >= 0).long()

    # Every row's prompt left-padded, then the distinct ones, (G, P): the length is part of the key, so that
    # padding never passes for a token.
    pos, mask = left_padding(prompt_lengths)
    keys = torch.cat([input_ids.gather(1, pos) * mask, prompt_lengths[:, None]], dim=1)
    distinct, row_prompt = torch.unique(keys, dim=0, return_inverse=True)  # row_prompt[i]: the prompt of row i
    prompt_pos, prompt_mask = left_padding(distinct[:, -1])
    out = model(
        input_ids=distinct[:, :-1],
        attention_mask=prompt_mask,
        position_ids=prompt_pos,
        use_cache=True,
        logits_to_keep=1,  # only the last prompt token's logits: they predict the first response token
    )
    # The cache's name, in the output as in the forward's arguments: ``cache`` from transformers 5.2x on,
    # ``past_key_values`` before.
    cache_name = "cache" if "cache" in out else "past_key_values"
    cache = out[cache_name]
    cache.batch_select_indices(row_prompt)  # every row gets its prompt's keys and values: (B, ...)

    # The responses, right-padded, at positions that continue their prompt: (B, R), R >= 1 (one masked column
    # when no row has a response: the forward still runs).
    n_cols = int(response_mask.sum(1).max())
    cols, response_valid = _response_columns(response_mask, at_least=1)
    r_pos = prompt_lengths[:, None] + cols
    response_ids = input_ids.gather(1, r_pos.clamp(max=width - 1)) * response_valid
    rest = model(
        input_ids=response_ids,
        attention_mask=torch.cat([prompt_mask[row_prompt], response_valid.long()], dim=1),
        position_ids=r_pos,
        use_cache=True,
        **{cache_name: cache},
    )
    # response token t is predicted by response position t-1, and token 0 by the prompt's last position
    logits = torch.cat([out.logits[row_prompt], rest.logits[:, :-1]], dim=1)
    return _token_logps(logits, response_ids, response_valid)[:, :n_cols]


def packed_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    share_prompt: bool = False,
) -> torch.Tensor:
    """``response_token_logps`` with the rows laid end to end as one sequence ``[1, N]``, no padding (verl's
    ``use_remove_padding``), position ids restarting with each row and attention kept within it: under
    ``flash_attention_2`` by its variable-length kernel (transformers derives the row boundaries from the position
    ids), under ``varlen_attn`` by torch's, under sdpa/eager by one scaled-dot-product attention per row (see
    ``attention``; sliding windows, soft-capping and sinks kept). Under gradient checkpointing the recomputation
    runs the same attention: the model is left with an implementation that reads the row layout it is given. Only
    the positions that predict a response token go through the head (``logits_to_keep`` as indices).

    ``share_prompt`` (not under ``flash_attention_2`` or ``varlen_attn``, which pack whole rows): each distinct
    prompt once, followed by the responses of its rows at the positions that continue it, each response attending to
    its prompt and itself: a group costs P + K·R tokens, as in ``shared_prompt_token_logps``, in one forward and with
    no KV cache (so also under gradient checkpointing). Rows are laid out as ``collate`` makes them.
    """
    device = input_ids.device
    flash = model.config._attn_implementation.startswith("flash")
    packed_name = None if flash else attention.packed_forward_name(model)
    share_prompt = share_prompt and packed_name == attention.SEGMENT_ATTENTION
    lengths, n_prompt = attention_mask.sum(1).long().tolist(), prompt_lengths.long().tolist()
    rows = [input_ids[i, : lengths[i]] for i in range(len(lengths))]
    groups: dict[tuple, list[int]] = {}  # a prompt (or, not sharing, a row) -> its rows, in order of first appearance
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row[: n_prompt[i]].tolist()) if share_prompt else (i,), []).append(i)
    pieces, positions, segments = [], [], []  # segments: (length, index of the prompt segment it follows or -1)
    predictor, target, row_col = [], [], []  # per response token: the index predicting it, its id, (row, column)
    n = 0
    for members in groups.values():
        p = n_prompt[members[0]]
        prompt_end, prompt_segment = n + p, len(segments)  # not sharing: the row's own prompt, in its segment
        if share_prompt:
            pieces.append(rows[members[0]][:p])
            positions.append(torch.arange(p))
            segments.append((p, -1))
            n += p
        for i in members:
            body = rows[i][p:] if share_prompt else rows[i]  # what this row adds to the sequence
            pieces.append(body)
            positions.append(torch.arange(lengths[i] - len(body), lengths[i]))
            segments.append((len(body), prompt_segment if share_prompt else -1))
            first_response = n if share_prompt else n + p
            # token 0 is predicted by the prompt's last position, token j by the response's position j - 1
            predictor += [prompt_end - 1 if j == 0 else first_response + j - 1 for j in range(lengths[i] - p)]
            row_col += [(i, j) for j in range(lengths[i] - p)]
            target.append(rows[i][p:])
            n += len(body)
    ids, pos = torch.cat(pieces)[None], torch.cat(positions).to(device)[None]  # (1, N)
    where = torch.tensor(predictor, dtype=torch.long, device=device)
    if flash:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=where).logits
    else:
        with attention.attention(model, packed_name):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=where,
                           segments=segments).logits  # fmt: skip
    targets = torch.cat(target)[None]  # (1, M): one logit row per response token
    logps = _token_logps(logits, targets, torch.ones(targets.shape, device=device))[0]
    _, valid = _response_columns(response_mask)
    out = torch.zeros(valid.shape, dtype=logps.dtype, device=device)
    if row_col:
        index = torch.tensor(row_col, device=device).T
        out = out.index_put((index[0], index[1]), logps)
    return out
