"""Packed rows (no padding, attention kept within each row) give the padded forward's log-probs and gradients."""

import pytest
import torch

from sppo_lightning.data.batching import collate
from sppo_lightning.data.examples import Example
from sppo_lightning.logprobs import packed_token_logps, response_token_logps, shared_prompt_token_logps

A, B, C = [1, 20, 21, 22, 23], [0, 24], [24]  # C: B without its first token, which is the padding id
ROWS = [Example(A, [30, 31, 2], 0, 0, 0, 0), Example(B, [33], 0, 0, 0, 7), Example(A, [32, 2], 0, 0, 0, 0),
        Example(B, [34, 35, 36, 2], 0, 0, 0, 7), Example(C, [30, 2], 0, 0, 0, 3), Example(A, [], 0, 0, 0, 0),
        Example(A, [30, 2], 0, 0, 0, 0)]  # fmt: skip
WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0, 2.0, 4.0, -1.0])[:, None]  # a loss that weighs every row differently


def policy(tiny_model_dir, attn: str, checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()  # no dropout
    if checkpointing:  # recomputation runs in training mode only; the tiny model has no dropout to turn off
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model


def logps_and_grads(model, fn):
    model.zero_grad()
    logps = fn()
    (logps * WEIGHTS).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("share_prompt", [False, True], ids=["rows", "shared-prompt"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_packed_rows_give_the_padded_values_and_gradients(tiny_model_dir, attn, share_prompt, checkpointing):
    """Prompts of different lengths, rows interleaved, responses of 0 to 4 tokens: the packed forward (each row
    whole, or each prompt once with its responses) equals the right-padded one, values and gradients, also under
    gradient checkpointing (whose recomputation once ran whole-sequence attention: CheckpointError)."""
    model = policy(tiny_model_dir, attn, checkpointing)
    b = collate(ROWS, pad_id=0)
    rows = (b.input_ids, b.attention_mask, b.response_mask)
    padded, padded_grads = logps_and_grads(model, lambda: response_token_logps(model, *rows))
    packed, packed_grads = logps_and_grads(
        model, lambda: packed_token_logps(model, *rows, b.prompt_lengths, share_prompt=share_prompt)
    )
    assert packed.shape == padded.shape == (7, 4)
    assert padded[5].abs().sum() == 0  # the empty response has nothing, in both
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():  # rounding scales with the largest entry (v_proj.bias sums ~1e5 terms)
        scale = float(grad.abs().max())
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5 * max(scale, 1), rtol=1e-4, msg=name)


def test_packing_sends_no_padding_and_each_shared_prompt_once(tiny_model_dir):
    """What goes through the model: the real tokens of the rows (8 + 3 + 7 + 6 + 3 + 5 + 7 = 39), or with shared
    prompts each distinct prompt once plus the responses (5 + 2 + 1 + 14 = 22), against 7 x 8 = 56 padded."""
    model = policy(tiny_model_dir, "sdpa")
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    b = collate(ROWS, pad_id=0)
    rows = (b.input_ids, b.attention_mask, b.response_mask)
    with torch.no_grad():
        response_token_logps(model, *rows)
        packed_token_logps(model, *rows, b.prompt_lengths)
        packed_token_logps(model, *rows, b.prompt_lengths, share_prompt=True)
    assert seen == [56, 39, 22]


def test_the_shared_prompt_path_runs_the_same_forwards_whatever_the_data(tiny_model_dir):
    """Ranks step together under FSDP: a micro-batch where no prompt repeats, or with no response token at all,
    takes the same two forwards as one where prompts repeat (it used to fall back to one forward)."""
    model = policy(tiny_model_dir, "sdpa")
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(1))
    batches = {
        "repeating": collate([Example(A, [30, 2], 0, 0, 0, 0), Example(A, [31], 0, 0, 0, 0)], pad_id=0),
        "distinct": collate([Example(A, [30, 2], 0, 0, 0, 0), Example(B, [31], 0, 0, 0, 1)], pad_id=0),
        "no response": collate([Example(A, [], 0, 0, 0, 0), Example(B, [], 0, 0, 0, 1)], pad_id=0),
    }
    counts = {}
    for name, b in batches.items():
        calls.clear()
        with torch.no_grad():
            out = shared_prompt_token_logps(model, b.input_ids, b.attention_mask, b.response_mask, b.prompt_lengths)
        counts[name] = len(calls)
        expected = response_token_logps(model, b.input_ids, b.attention_mask, b.response_mask).detach()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert counts == {"repeating": 2, "distinct": 2, "no response": 2}
