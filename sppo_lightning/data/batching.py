"""Micro-batches of whole groups, collated into the tensors the module trains on."""

from __future__ import annotations

import random

import torch

from sppo_lightning.data.examples import Example


def collate(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + response ids right-padded to one width; ``response_mask`` marks the response tokens."""
    seqs = [r.prompt_ids + r.response_ids for r in rows]
    width = max(map(len, seqs))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, seq) in enumerate(zip(rows, seqs, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        response_mask[i, len(row.prompt_ids) : len(seq)] = 1.0
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "win_rates": torch.tensor([r.win_rate for r in rows]),
        "targets": torch.tensor([r.target for r in rows]),
        "rewards": torch.tensor([r.reward for r in rows]),
        "group": torch.tensor([r.group for r in rows]),  # rows of a group share their prompt
        "prompt_lengths": torch.tensor([len(r.prompt_ids) for r in rows]),
    }
    if all(r.ref_logps is not None for r in rows):  # π_t log-probs from the rollout: no forward pass needed
        # response-aligned and zero-padded, as the module's own ``token_logps``
        ref = torch.zeros((len(rows), max(len(r.response_ids) for r in rows)), dtype=torch.float32)
        for i, row in enumerate(rows):
            ref[i, : len(row.ref_logps)] = torch.tensor(row.ref_logps)
        batch["ref_logps"] = ref
    return batch


def micro_batches(
    groups: list[list[Example]], micro_batch_size: int, pad_id: int, seed: int, balance_tokens: bool = False
) -> list[dict]:
    """Pack whole groups (never splitting one) into micro-batches of ``micro_batch_size`` rows.

    Default: groups in a shuffled order. ``balance_tokens``: groups sorted by length, so that every rank's i-th
    micro-batch holds its i-th longest groups and ranks that step together carry similar token counts (less waiting
    in the gradient reduction, less padding); the micro-batches are then shuffled with ``seed``, the same order on
    every rank.
    """
    rng = random.Random(seed)
    order = list(range(len(groups)))
    if balance_tokens:
        order.sort(key=lambda g: -sum(len(r.prompt_ids) + len(r.response_ids) for r in groups[g]))
    else:
        rng.shuffle(order)
    batches, current = [], []
    for g in order:
        current.extend(groups[g])
        if len(current) >= micro_batch_size:
            batches.append(collate(current, pad_id))
            current = []
    if current:
        batches.append(collate(current, pad_id))
    if balance_tokens:
        rng.shuffle(batches)
    return batches


def repeat_passes(batches: list[dict], passes: int, seed: int) -> list[dict]:
    """The micro-batches ``passes`` times, the first pass in packing order and each later one reshuffled (the same
    order on every rank, which step together)."""
    rng = random.Random(seed)
    out = list(batches)
    for _ in range(passes - 1):
        out += rng.sample(batches, len(batches))
    return out
