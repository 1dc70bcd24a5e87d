"""Examples per loss_type, grouping through shuffling, response-only masks."""

from dataclasses import replace

import torch

from sppo_lightning.data.batching import collate, micro_batches
from sppo_lightning.data.examples import Example, build_groups
from sppo_lightning.data.prompts import PromptRecord
from sppo_lightning.preference import win_rates_from_rewards
from sppo_lightning.rollout.base import Rollout


def make_rollout(rewards):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    p, k = rewards.shape
    return Rollout(
        prompts=[PromptRecord([{"role": "user", "content": f"q{i}"}], "1") for i in range(p)],
        prompt_ids=[[10 + i, 11 + i] for i in range(p)],
        response_ids=[[[100 * i + j] * (j + 1) for j in range(k)] for i in range(p)],
        response_text=[["x"] * k for _ in range(p)],
        rewards=rewards,
        win_rates=win_rates_from_rewards(rewards),
    )


def test_sppo_keeps_all_k_with_eta_times_win_rate_minus_half():
    groups = build_groups(make_rollout([[1, 0, 0, 0]]), "sppo", eta=2.0)
    assert len(groups) == 1 and len(groups[0]) == 4
    # the winner: (0.5 + 3) / 4 = 0.875 -> 2 * 0.375; each loser: (0.5 + 0.5 + 0.5) / 4 = 0.375 -> 2 * -0.125
    assert [e.target for e in groups[0]] == [0.75, -0.25, -0.25, -0.25]


def test_pair_losses_take_winner_then_loser_and_dpo_ipo_drop_ties():
    rollout = make_rollout([[0, 1, 0], [1, 1, 1]])
    pair = build_groups(rollout, "sppo_pair", eta=1.0)
    # winner: the best; loser: the last of the worst
    assert [e.response_ids for e in pair[0]] == [rollout.response_ids[0][1], rollout.response_ids[0][2]]
    assert len(pair) == 2  # the all-tie group stays for SPPO (its targets are 0), with two different responses
    assert [e.target for e in pair[1]] == [0.0, 0.0]
    assert [e.response_ids for e in pair[1]] == [rollout.response_ids[1][0], rollout.response_ids[1][2]]
    for loss_type in ("dpo", "ipo"):  # no preference to learn from an all-tie group
        [group] = build_groups(rollout, loss_type, eta=1.0)
        assert [e.response_ids for e in group] == [e.response_ids for e in pair[0]]


def test_softmean_targets_use_the_pool():
    rollout = make_rollout([[1], [0]])
    groups = build_groups(rollout, "sppo_softmean", eta=1.0, rewards_all=torch.tensor([0.0, 0.0, 0.0, 0.0]))
    assert [g[0].target for g in groups] == [1.0, 0.0]  # baseline softmean(0,0,0,0) = 0


def test_groups_stay_whole_through_shuffling():
    rollout = make_rollout([[1, 0, 0, 1]] * 6)
    groups = build_groups(rollout, "sppo", eta=1.0)
    batches = micro_batches(groups, micro_batch_size=8, pad_id=0, seed=3)
    assert [b.input_ids.shape[0] for b in batches] == [8, 8, 8]
    order = [int(g) for b in batches for g in b.group]
    assert order != sorted(order)  # shuffled ...
    for b in batches:  # ... but each group's 4 rows are together, in one micro-batch
        ids, counts = b.group.unique(return_counts=True)
        assert counts.tolist() == [4] * len(ids)


def test_collate_masks_the_response_only():
    rows = [Example([1, 2, 3], [7, 8], 1.0, 0.75, 0.25, 0), Example([4], [9, 9, 9], 0.0, 0.25, -0.25, 0)]
    b = collate(rows, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 9, 9, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert b.targets.tolist() == [0.25, -0.25]


def test_balanced_micro_batches_line_up_by_length_across_ranks():
    """Two ranks with different responses: sorted packing gives each rank's i-th micro-batch similar token counts,
    the same shuffled order on both, whole groups, and less padding than a random packing."""

    def rank_groups(lengths):  # one group of 2 rows per prompt
        return [[Example([1, 2], [5] * n, 0.0, 0.5, 0.0, g), Example([1, 2], [6] * n, 0.0, 0.5, 0.0, g)]
                for g, n in enumerate(lengths)]  # fmt: skip

    import random

    lengths = list(range(2, 34, 2))
    a, b = lengths[:], lengths[:]
    random.Random(0).shuffle(a)
    random.Random(1).shuffle(b)
    batches_a = micro_batches(rank_groups(a), 4, pad_id=0, seed=7, balance_tokens=True)
    batches_b = micro_batches(rank_groups(b), 4, pad_id=0, seed=7, balance_tokens=True)
    tokens = [[int(x.attention_mask.sum()) for x in bs] for bs in (batches_a, batches_b)]
    assert tokens[0] == tokens[1]  # same lengths on both ranks: identical work per step
    assert tokens[0] != sorted(tokens[0], reverse=True)  # but not trained longest-first
    for bs in (batches_a, batches_b):
        for x in bs:
            assert x.group.unique(return_counts=True)[1].tolist() == [2] * (len(x.group) // 2)
    padded = sum(x.attention_mask.numel() for x in batches_a)
    shuffled = sum(x.attention_mask.numel() for x in micro_batches(rank_groups(a), 4, 0, seed=7))
    assert padded < shuffled


def test_a_token_budget_keeps_groups_whole_and_under_the_budget():
    """Groups of 2 rows carrying 2 x (2 + n) tokens, budget 40: every micro-batch holds whole groups and at most 40
    tokens, except a group bigger than the budget alone; first-fit by decreasing size needs the fewest."""
    from sppo_lightning.data.batching import group_tokens

    lengths = [3, 14, 5, 8, 1, 9, 2, 30]  # group tokens 10, 32, 14, 20, 6, 22, 8, 64
    groups = [[Example([1, 2], [5] * n, 0.0, 0.5, 0.0, g), Example([1, 2], [6] * n, 0.0, 0.5, 0.0, g)]
              for g, n in enumerate(lengths)]  # fmt: skip
    batches = micro_batches(groups, micro_batch_size=2, pad_id=0, seed=3, max_tokens=40)
    seen = sorted(g for b in batches for g in b.group.unique().tolist())
    assert seen == list(range(8))  # every group once
    for b in batches:
        counts = b.group.unique(return_counts=True)[1].tolist()
        assert counts == [2] * len(counts)  # whole groups
        tokens = int(b.attention_mask.sum())
        assert tokens <= 40 or b.group.unique().tolist() == [7]  # the 64-token group goes alone
    assert len(batches) == 4  # 64 | 32+8 | 22+14 | 20+10+6: the 112 tokens besides the 64 need at least 3
    assert sum(group_tokens(g) for g in groups) == 176


def test_step_units_count_the_rows_of_each_window_and_skip_empty_and_filler_rows():
    from sppo_lightning.data.batching import attach_step_units, filler

    def batch(*response_lengths):
        return collate([Example([1, 2], [5] * n, 0.0, 0.5, 0.0, 0) for n in response_lengths], pad_id=0)

    batches = [batch(3, 0), batch(2, 2), batch(4, 1)]
    batches.append(filler(batches))
    attach_step_units(batches, window=3)  # windows: [1 + 2 + 2 rows], [a filler: 0]
    assert [float(b.step_units) for b in batches] == [5.0, 5.0, 5.0, 0.0]
    pairs = [replace(b, paired=True) for b in batches]  # the same rows as (winner, loser) pairs
    attach_step_units(pairs, window=2)  # pairs: (3, 0) does not count, (2, 2) and (4, 1) do
    assert [float(b.step_units) for b in pairs] == [1.0, 1.0, 1.0, 1.0]
    # two ranks: every micro-batch gets the window's total over both
    attach_step_units(batches, window=3, all_ranks_sum=lambda t: t * 2)
    assert float(batches[0].step_units) == 10.0


def test_a_paired_batch_hands_out_each_groups_winner_and_loser_and_refuses_another_layout():
    import pytest

    rollout = make_rollout([[0, 1, 0], [1, 0, 1]])
    groups = build_groups(rollout, "sppo_pair", eta=1.0)
    [batch] = micro_batches(groups, micro_batch_size=4, pad_id=0, seed=3, paired=True)
    assert batch.pairs(batch.group).tolist() in ([[0, 0], [1, 1]], [[1, 1], [0, 0]])
    for (win, lose), g in zip(batch.pairs(batch.win_rates).tolist(), batch.pairs(batch.group)[:, 0], strict=True):
        assert (win, lose) == (max(rollout.win_rates[g].tolist()), min(rollout.win_rates[g].tolist()))
    with pytest.raises(ValueError, match="pairs of one group"):
        collate([groups[0][0], groups[1][0]], pad_id=0, paired=True)  # two winners of different prompts
    with pytest.raises(ValueError, match="not laid out"):
        collate(groups[0], pad_id=0).pairs(torch.zeros(2))
