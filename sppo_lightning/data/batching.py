"""Micro-batches of whole groups, collated into the ``TrainBatch``es the module trains on, and the share each
micro-batch has in its optimizer step.

A step's gradient is the mean over every loss term of that step on every rank, whatever the split into
micro-batches (by rows or by a token budget) and ranks (which may hold different row counts): each micro-batch
carries ``step_units``, the number of loss terms of its step over all ranks, and the module divides its sum by that
(``SPPOModule.training_step``). Rows with an empty response count for nothing (``row_weight`` 0), as verl masks
them; so do the filler micro-batches that keep ranks and steps in line (``filler``). Which rows make a step is
``steps``' concern.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import torch

from sppo_lightning.data.examples import Example
from sppo_lightning.health import logprob_rows
from sppo_lightning.loss import loss_weights
from sppo_lightning.records import Rollout, TrainBatch


def collate(rows: list[Example], pad_id: int, paired: bool = False, grouped: bool = False) -> TrainBatch:
    """Prompt + response ids right-padded to one width; ``response_mask`` marks the response tokens.

    ``paired``: the rows are (winner, loser) pairs, each pair one group, winner first (``build_groups``' layout for a
    paired loss type); the batch then hands them out as ``[B/2, 2]`` (``TrainBatch.pairs``). ``grouped``: the rows
    are whole groups of K (a grouped loss type), handed out as ``[B/K, K]`` (``TrainBatch.groups``).
    """
    if paired and (len(rows) % 2 or any(rows[i].group != rows[i + 1].group for i in range(0, len(rows), 2))):
        raise ValueError("a paired batch needs its rows in (winner, loser) pairs of one group each")
    seqs = [r.prompt_ids + r.response_ids for r in rows]
    width = max(map(len, seqs))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, seq) in enumerate(zip(rows, seqs, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        response_mask[i, len(row.prompt_ids) : len(seq)] = 1.0
    ref = None
    if all(r.ref_logps is not None for r in rows):  # π_t log-probs from the rollout: no forward pass needed
        # response-aligned and zero-padded, as the module's own ``token_logps``
        ref = torch.zeros((len(rows), max(len(r.response_ids) for r in rows)), dtype=torch.float32)
        for i, row in enumerate(rows):
            ref[i, : len(row.ref_logps)] = torch.tensor(row.ref_logps)
    sampler = None
    if rows and all(r.sampler_logps is not None for r in rows):  # what the engine reported, for the gap check
        sampler = logprob_rows([r.sampler_logps for r in rows], max(len(r.response_ids) for r in rows))
    preferences = None
    if rows and all(r.preferences is not None for r in rows):
        preferences = torch.tensor([r.preferences for r in rows], dtype=torch.float32)  # (B, K)
    if grouped and (preferences is None or len(rows) % preferences.shape[1]):
        raise ValueError("a grouped batch needs whole groups of K rows, each with its K preferences")
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        prompt_lengths=torch.tensor([len(r.prompt_ids) for r in rows]),
        group=torch.tensor([r.group for r in rows]),  # rows of a group share their prompt
        targets=torch.tensor([r.target for r in rows]),
        win_rates=torch.tensor([r.win_rate for r in rows]),
        # 1 = the row's loss term counts in its step's mean; an empty response has no token to learn from
        row_weight=torch.tensor([float(len(r.response_ids) > 0) for r in rows]),
        paired=paired,
        ref_logps=ref,
        sampler_logps=sampler,
        grouped=grouped,
        preferences=preferences,
    )


def group_tokens(group: list[Example]) -> int:
    """Tokens a group sends through the model as whole rows (prompt + response each), what a budget counts."""
    return sum(len(r.prompt_ids) + len(r.response_ids) for r in group)


def micro_batches(
    groups: list[list[Example]],
    micro_batch_size: int,
    pad_id: int,
    seed: int,
    balance_tokens: bool = False,
    max_tokens: int | None = None,
    paired: bool = False,
    grouped: bool = False,
) -> list[TrainBatch]:
    """Pack whole groups (never splitting one) into micro-batches of ``micro_batch_size`` rows, or, with
    ``max_tokens``, of at most that many tokens (verl's ``use_dynamic_bsz``; a group longer than the budget goes
    alone).

    Default: groups in a shuffled order. ``balance_tokens``: groups sorted by length, so that every rank's i-th
    micro-batch holds its i-th longest groups and ranks that step together carry similar token counts (less waiting
    in the gradient reduction, less padding); the micro-batches are then shuffled with ``seed``, the same order on
    every rank. A token budget always fills first-fit by decreasing length (fewest micro-batches), then shuffles.
    ``paired``: the groups are (winner, loser) pairs; ``grouped``: one loss term per group (see ``collate``).
    """
    rng = random.Random(seed)
    order = list(range(len(groups)))
    if balance_tokens or max_tokens is not None:
        order.sort(key=lambda g: -group_tokens(groups[g]))
    else:
        rng.shuffle(order)
    if max_tokens is not None:
        bins: list[list[int]] = []  # group indices per micro-batch
        room: list[int] = []
        for g in order:
            need = group_tokens(groups[g])
            fit = next((i for i, left in enumerate(room) if need <= left), None)
            if fit is None:
                bins.append([])
                room.append(max_tokens)
                fit = len(bins) - 1
            bins[fit].append(g)
            room[fit] -= need
        batches = [collate([r for g in sorted(b) for r in groups[g]], pad_id, paired, grouped) for b in bins]
        rng.shuffle(batches)
        return batches
    batches, current = [], []
    for g in order:
        current.extend(groups[g])
        if len(current) >= micro_batch_size:
            batches.append(collate(current, pad_id, paired, grouped))
            current = []
    if current:
        batches.append(collate(current, pad_id, paired, grouped))
    if balance_tokens:
        rng.shuffle(batches)
    return batches


def filler(batches: list[TrainBatch]) -> TrainBatch:
    """The smallest of ``batches`` with every row weighing 0: a micro-batch that runs the same forward and backward
    as the others (so ranks and collectives stay in step) and adds nothing to the gradient."""
    smallest = min(batches, key=lambda b: int(b.attention_mask.sum()))
    return replace(smallest, row_weight=torch.zeros_like(smallest.row_weight), filler=True)


def placeholder(rollout: Rollout, pad_id: int, paired: bool = False) -> TrainBatch:
    """A zero-weight micro-batch for a rank with no group to train (all its prompts tied under DPO/IPO): its first
    prompt and first response (twice, as a pair, for a paired loss type), to copy fillers from."""
    row = Example(rollout.prompt_ids[0], rollout.response_ids[0][0], 0.0, 0.5, 0.0, group=0)
    batch = collate([row, row] if paired else [row], pad_id, paired)
    return replace(batch, row_weight=torch.zeros_like(batch.row_weight), filler=True)


def attach_step_units(
    batches: list[TrainBatch], window: int, all_ranks_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Give every micro-batch ``step_units``: the loss terms (rows, pairs or groups) that count in its
    optimizer step, summed over all ranks. Steps are Lightning's accumulation windows of ``window`` micro-batches,
    the last one possibly short; ``all_ranks_sum`` sums a tensor over ranks (None: a single process)."""
    steps = [batches[i : i + window] for i in range(0, len(batches), window)]
    units = torch.tensor(
        [sum(float(loss_weights(b.row_weight, b.paired, b.rows_per_term).sum()) for b in step) for step in steps]
    )
    if all_ranks_sum is not None:
        units = all_ranks_sum(units)
    for step, n in zip(steps, units.tolist(), strict=True):
        for b in step:
            b.step_units = torch.tensor(n)
