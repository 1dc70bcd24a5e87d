"""Which prompts an iteration uses: drawn pass by pass over the pool, reshuffled each pass with the seed.

The draw is a pure function of (seed, epoch), so the draw position needs no state of its own: the epoch counter
in the checkpoint is enough for a resumed run to continue exactly where it stopped.
"""

from __future__ import annotations

import random


def draw_indices(pool_size: int, per_epoch: int | None, epoch: int, seed: int) -> list[int]:
    """Indices into the prompt pool for iteration ``epoch`` (0-based); the whole pool when ``per_epoch`` is None."""
    if per_epoch is None:
        per_epoch = pool_size
    start = epoch * per_epoch
    out: list[int] = []
    while len(out) < per_epoch:
        pass_idx, offset = divmod(start + len(out), pool_size)
        order = list(range(pool_size))
        random.Random(seed * 1_000_003 + pass_idx).shuffle(order)
        out.extend(order[offset : offset + per_epoch - len(out)])
    return out


def shard(items: list, rank: int, world_size: int) -> list:
    """This rank's share, equal on every rank (a remainder is dropped so that ranks stay in lock-step)."""
    usable = len(items) - len(items) % world_size
    return items[rank:usable:world_size]
