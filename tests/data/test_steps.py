"""An optimizer step is ``data.rows_per_step`` rows over all ranks (verl's ``ppo_mini_batch_size``): the steps per
rollout are rows per rollout / rows per step whatever the response lengths, the token budget and the number of
processes; only the micro-batches inside a step change.

The plan is checked here as the datamodule computes it (``steps`` with ``batching.micro_batches``, real collated
batches, no model), for 1 to 8 simulated ranks; real fits on 2 processes are in tests/test_steps_fit.py.
"""

import random
from functools import partial
from pathlib import Path

import pytest
import yaml

from sppo_lightning.data.batching import micro_batches
from sppo_lightning.data.draw import shard
from sppo_lightning.data.examples import Example
from sppo_lightning.data.steps import (
    cut_into_steps,
    deal_to_steps,
    micro_batches_per_step,
    passes,
    resolve_rows_per_step,
    steps_per_rollout,
)
from sppo_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PROMPT = 125  # tokens of a MATH prompt after the chat template (the README's workload)

# response lengths of a rollout: (median, spread), capped at max_response_length 512
MIXES = {"short": (120, 0.3), "medium": (250, 0.3), "long": (400, 0.3), "bimodal": (None, None)}


def response_lengths(mix: str, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    median, spread = MIXES[mix]
    if median is None:  # half cut short, half truncated at the limit
        return [rng.randrange(10, 60) if rng.random() < 0.5 else 512 for _ in range(n)]
    return [max(1, min(512, round(rng.lognormvariate(0, spread) * median))) for _ in range(n)]


def plan(mix: str, world: int, rows_per_step: int, max_tokens: int | None, prompts: int = 1024, k: int = 1):
    """Each simulated rank's micro-batches per step for a rollout of ``prompts`` x ``k`` rows, as
    ``RolloutDataModule.plan_steps`` makes them; returns (steps, micro-batches per step, rows of each step summed
    over ranks)."""
    lengths = response_lengths(mix, prompts * k)
    rows_per_step = resolve_rows_per_step(rows_per_step, 4, 1, world, k, max_tokens)
    per_rank = []
    for rank in range(world):
        mine = shard(list(range(prompts)), rank, world)
        groups = [
            [Example([1] * PROMPT, [2] * lengths[i * k + j], 0.0, 0.5, 0.0, group=p) for j in range(k)]
            for p, i in enumerate(mine)
        ]
        steps = steps_per_rollout(len(mine) * world * k, rows_per_step)
        cut = partial(micro_batches, micro_batch_size=4, pad_id=0, seed=0, balance_tokens=True, max_tokens=max_tokens)
        per_rank.append(cut_into_steps(groups, len(mine), steps, seed=0, cut=cut))
    counts = {len(steps) for steps in per_rank}
    assert len(counts) == 1  # every rank makes the same number of steps
    size = micro_batches_per_step(max(len(step) for steps in per_rank for step in steps))
    rows = [sum(len(b.row_weight) for steps in per_rank for b in steps[s]) for s in range(counts.pop())]
    return len(rows), size, rows


@pytest.mark.parametrize("max_tokens", [None, 1792], ids=["by rows", "1,792-token budget"])
def test_steps_per_rollout_are_rows_over_rows_per_step_for_any_lengths_and_processes(max_tokens):
    """The 7B recipe's shape: 1,024 rows a rollout, 256 a step, micro-batches of 4 rows or 1,792 tokens. Before, a
    step was 16 micro-batches per rank: 3, 4 or 5 steps with the budget depending on the lengths, 2 on 8 GPUs."""
    sizes = {}
    for mix in MIXES:
        for world in (1, 2, 4, 8):
            steps, size, rows = plan(mix, world, 256, max_tokens)
            assert steps == 4 and rows == [256] * 4, (mix, world)
            sizes[mix, world] = size
    if max_tokens is None:  # 256 rows / (world x 4-row micro-batches)
        assert all(size == 64 // world for (_, world), size in sizes.items())
    else:  # the budget packs short responses tighter: fewer micro-batches a step, the same steps
        assert sizes["short", 4] < sizes["long", 4]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_groups_of_k_stay_whole_and_a_partial_last_step_is_merged(world):
    """K = 5: 200 prompts = 1,000 rows, 240 rows a step -> 4 steps (1000 // 240), the 40 rows left over are dealt
    into them (250 each), not a short fifth step."""
    steps, _, rows = plan("medium", world, 240, 1792, prompts=200, k=5)
    assert steps == 4 and sum(rows) == 1000 and max(rows) - min(rows) <= 5 * world


def test_a_rollout_smaller_than_a_step_is_one_step_and_prompts_are_dealt_evenly():
    assert steps_per_rollout(100, 256) == 1 and steps_per_rollout(1024, 256) == 4 and steps_per_rollout(1100, 256) == 4
    dealt = deal_to_steps(10, 4, seed=3)
    assert [len(d) for d in dealt] == [3, 3, 2, 2] and sorted(sum(dealt, [])) == list(range(10))
    assert deal_to_steps(10, 4, seed=3) == dealt  # the same on every rank


def test_dropped_groups_leave_their_step_lighter_not_fewer_steps():
    """DPO drops all-tie groups: the rank's prompts are dealt by position, so the steps keep their count."""
    groups = [[Example([1], [2], 0.0, 0.5, 0.0, group=p)] * 2 for p in range(8) if p % 3]  # 3 of 8 dropped
    per_step = cut_into_steps(groups, 8, 4, seed=0, cut=lambda gs: [[g[0].group for g in gs]] if gs else [])
    assert len(per_step) == 4 and sorted(p for s in per_step for b in s for p in b) == [1, 2, 4, 5, 7]


def test_later_passes_go_over_the_same_steps_in_a_new_order():
    steps = [[{"i": i, "j": j} for j in range(2)] for i in range(5)]
    assert passes(steps, 1, seed=0) == steps
    three = passes(steps, 3, seed=0)
    assert three[:5] == steps and len(three) == 15
    for p in (1, 2):
        assert sorted(s[0]["i"] for s in three[5 * p : 5 * (p + 1)]) == list(range(5))  # every step once a pass
    assert three[5:10] != steps or three[10:] != steps  # reordered
    assert passes(steps, 3, seed=0) == three  # the same order on every rank


CASES = {
    "not whole groups on every rank": (dict(rows_per_step=100, world_size=8), "positive multiple of 8"),
    "not a multiple of K": (dict(rows_per_step=258, group_rows=4, world_size=1), "positive multiple of 4 "),
    "accumulate under a token budget": (dict(accumulate=16, max_tokens=1792), "accumulate_grad_batches=16 contra"),
    "accumulate with other rows": (dict(accumulate=8), "accumulate_grad_batches=8 contradicts data.rows_per_step=256"),
}


@pytest.mark.parametrize(("kw", "message"), CASES.values(), ids=CASES.keys())
def test_contradicting_or_impossible_rows_per_step_is_refused_by_name(kw, message):
    args = dict(rows_per_step=256, micro_batch_size=4, accumulate=1, world_size=4, group_rows=1, max_tokens=None)
    with pytest.raises(ConfigError, match=message):
        resolve_rows_per_step(**{**args, **kw})


def test_an_accumulation_that_says_the_same_is_accepted_and_none_reads_it_as_trl():
    assert resolve_rows_per_step(256, 4, 16, 4, 1, None) == 256  # 4 rows x 16 x 4 processes
    assert resolve_rows_per_step(None, 4, 16, 4, 1, 1792) == 256  # TRL: per device x accumulation x processes
    assert resolve_rows_per_step(None, 4, 16, 8, 1, 1792) == 512  # ... which doubles on two nodes


def config(*names: str) -> dict:
    """The configs layered as the CLI does (later files override earlier keys, section by section)."""
    merged: dict = {}
    for name in names:
        for section, values in yaml.safe_load((REPO / "configs" / name).read_text()).items():
            merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    return merged


SEVEN_B = {"seed recipe, K = 1": (("qwen2.5-7b-math.yaml",), 1),
           "paper overlay, K = 5": (("qwen2.5-7b-math.yaml", "qwen2.5-7b-math-sppo.yaml"), 5)}  # fmt: skip


@pytest.mark.parametrize(("configs", "group_rows"), SEVEN_B.values(), ids=SEVEN_B.keys())
@pytest.mark.parametrize("budget", [True, False], ids=["budget", "no budget"])
@pytest.mark.parametrize("nodes", [1, 2], ids=["4 GPUs", "8 GPUs over 2 nodes"])
def test_7b_configs_make_4_steps_per_rollout_on_one_node_and_on_two(configs, group_rows, budget, nodes):
    c = config(*configs)
    t, d = c["trainer"], c["data"]
    world = t["devices"] * nodes
    rows = resolve_rows_per_step(d["rows_per_step"], d["micro_batch_size"], t.get("accumulate_grad_batches", 1),
                                 world, group_rows, d["max_tokens_per_micro_batch"] if budget else None)  # fmt: skip
    rollout_rows = len(shard(list(range(d["prompts_per_epoch"])), 0, world)) * world * d["samples_per_prompt"]
    assert steps_per_rollout(rollout_rows, rows) == 4


@pytest.mark.parametrize("name", ["llama-3-8b-sppo-pairrm.yaml", "mistral-7b-sppo-pairrm.yaml"])
def test_pairrm_configs_step_every_64_pairs(name):
    t, d = config(name)["trainer"], config(name)["data"]
    assert "accumulate_grad_batches" not in t
    assert resolve_rows_per_step(d["rows_per_step"], d["micro_batch_size"], 1, t["devices"], 2, None) // 2 == 64
