"""Optimizer steps of a rollout: a fixed number of rows over all ranks, cut into micro-batches inside each step.

verl's ``actor.ppo_mini_batch_size`` (× ``rollout.n``) is the rows of one optimizer step whatever the response
lengths and the number of GPUs; ``use_dynamic_bsz`` only changes how those rows are cut into micro-batches. The same
here (``data.rows_per_step``): a rollout of R rows makes R // rows_per_step steps, each rank's prompts are dealt to
the steps by position (so groups that drop out, like DPO's ties, leave a step lighter but never change the count),
each step's groups are cut into micro-batches (rows or token budget), and every step on every rank is topped up with
zero-weight fillers to the same number of micro-batches, which becomes Lightning's ``accumulate_grad_batches`` for
the iteration. Pure functions; the datamodule calls them.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

from sppo_lightning.data.examples import Example
from sppo_lightning.errors import ConfigError


def resolve_rows_per_step(
    rows_per_step: int | None,
    micro_batch_size: int,
    accumulate: int,
    world_size: int,
    group_rows: int,
    max_tokens: int | None,
) -> int:
    """The rows of one optimizer step over all ranks, or ``ConfigError`` for a contradicting or impossible setting.

    None reads the step as TRL does (``per_device_train_batch_size × gradient_accumulation_steps × processes``):
    ``micro_batch_size × accumulate × world_size`` rows. A given ``rows_per_step`` fixes it; then
    ``trainer.accumulate_grad_batches`` is derived, and a value other than 1 is refused unless it says the same
    (rows cut by ``micro_batch_size``, no token budget, ``micro_batch_size × accumulate × world_size`` rows).
    A step must hold whole groups on every rank: a multiple of ``world_size × group_rows``.
    """
    if rows_per_step is None:
        rows_per_step = micro_batch_size * accumulate * world_size
    elif accumulate != 1 and (max_tokens is not None or micro_batch_size * accumulate * world_size != rows_per_step):
        per_micro = "a token budget" if max_tokens is not None else f"{micro_batch_size * world_size} rows"
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate} contradicts data.rows_per_step={rows_per_step} "
            f"({world_size} process(es), micro-batches of {per_micro}): remove trainer.accumulate_grad_batches, "
            "it is derived from data.rows_per_step"
        )
    need = world_size * group_rows
    if rows_per_step < 1 or rows_per_step % need:
        raise ConfigError(
            f"data.rows_per_step={rows_per_step} must be a positive multiple of {need} ({world_size} process(es) x "
            f"{group_rows} rows per prompt): every rank trains whole groups in every step"
        )
    return rows_per_step


def steps_per_rollout(rollout_rows: int, rows_per_step: int) -> int:
    """Optimizer steps one pass over a rollout makes: ``rollout_rows // rows_per_step``; a partial last step is merged
    into the others (rows dealt evenly), and a rollout smaller than one step is one step."""
    return max(1, rollout_rows // rows_per_step)


def deal_to_steps(num_prompts: int, steps: int, seed: int) -> list[list[int]]:
    """This rank's prompt positions dealt to ``steps`` steps: shuffled with ``seed``, then split as evenly as possible
    (the first ``num_prompts % steps`` steps take one more)."""
    order = list(range(num_prompts))
    random.Random(seed).shuffle(order)
    size, extra = divmod(num_prompts, steps)
    out, start = [], 0
    for s in range(steps):
        end = start + size + (s < extra)
        out.append(sorted(order[start:end]))
        start = end
    return out


def cut_into_steps(
    groups: list[list[Example]], num_prompts: int, steps: int, seed: int, cut: Callable[[list[list[Example]]], list]
) -> list[list]:
    """This rank's micro-batches, one list per step: prompt positions dealt to the steps (``deal_to_steps``), each
    step's groups (``Example.group`` is the prompt's position; a dropped group leaves its place empty) cut into
    micro-batches by ``cut`` (rows or a token budget, ``batching.micro_batches``)."""
    by_position = {g[0].group: g for g in groups}
    return [
        cut([by_position[p] for p in positions if p in by_position])
        for positions in deal_to_steps(num_prompts, steps, seed)
    ]


def micro_batches_per_step(most_on_this_rank: int, most_on_any_rank: Callable[[int], int] | None = None) -> int:
    """The micro-batches every step runs on every rank (Lightning's ``accumulate_grad_batches``): the most any rank
    needs for any of its steps, at least 1. ``most_on_any_rank`` takes a rank's count to the max over ranks (None:
    a single process)."""
    most = most_on_any_rank(most_on_this_rank) if most_on_any_rank is not None else most_on_this_rank
    return max(1, most)


def top_up(steps: list[list], per_step: int, make_filler: Callable[[], object]) -> list[list]:
    """Each step topped up to ``per_step`` micro-batches with zero-weight fillers, so that every rank runs the same
    forwards and backwards (sharded training meets in their collectives) and steps line up with Lightning's
    accumulation windows."""
    return [[*step, *(make_filler() for _ in range(per_step - len(step)))] for step in steps]


def passes(steps: list[list], count: int, seed: int) -> list[list]:
    """The steps ``count`` times: the first pass in order, each later one in a new order of whole steps (the same on
    every rank), as verl's ``ppo_epochs`` go over the same mini-batches again."""
    rng = random.Random(seed)
    out = list(steps)
    for _ in range(count - 1):
        out += [[copy.copy(b) for b in step] for step in rng.sample(steps, len(steps))]  # step_units per occurrence
    return out
