"""log π(y_t | x, y_<t) of every response token. Their sum over a response is log π(y|x), the quantity every SPPO
loss regresses (log π_θ(y|x) − log π_t(y|x)); the per-token values are what the trust region (``clip_ratio``) reads.

Both functions return ``[B, R]``, response-aligned: column j is the j-th token of each row's response, R the longest
response, 0 past a response's end. Two ways to the same numbers. ``response_token_logps`` runs every row, prompt
and response, through the model. ``shared_prompt_token_logps`` runs each distinct prompt once and lets the rows
that share it (the K responses of a group) continue from its KV cache: a group then costs P + K·R tokens instead
of K·(P + R), so with 32-token prompts and 10-token responses, K = 4 sends 72 tokens through the model instead of
168. Causal attention makes the two equal up to float rounding, gradients included: the prompt's keys and values
receive the gradient of every row that reads them, as the repeated prompt positions of the plain forward do.
"""

from __future__ import annotations

import torch


def _token_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask · log softmax(logits_t)[target_t]: ``[B, T, V], [B, T], [B, T] -> [B, T]``, without materialising the
    full log-probabilities."""
    logits = logits.float()
    return (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)) * mask


def _response_columns(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The response-aligned layout ``[B, R]`` both functions return: column indices ``[1, R]`` and which columns of
    each row hold a response token (R = the longest response)."""
    lengths = response_mask.sum(1).long()
    cols = torch.arange(int(lengths.max()), device=response_mask.device)[None, :]
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
    share it before the responses go through. When no prompt repeats (K = 1, as in the MATH recipe) that would
    only split one forward in two, so the rows go through ``response_token_logps`` instead.

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
    if len(distinct) == len(input_ids):
        return response_token_logps(model, input_ids, attention_mask, response_mask)
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

    # The responses, right-padded, at positions that continue their prompt: (B, R).
    cols, response_valid = _response_columns(response_mask)
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
    return _token_logps(logits, response_ids, response_valid)
