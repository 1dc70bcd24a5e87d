"""The prompt draw: pass by pass over the pool, reshuffled per pass, a pure function of (seed, epoch)."""

from sppo_lightning.data.draw import draw_indices, shard


def test_one_pass_covers_the_pool_once_then_reshuffles():
    pool = 10
    epochs = [draw_indices(pool, 4, e, seed=0) for e in range(5)]  # 20 draws = 2 passes
    flat = [i for e in epochs for i in e]
    assert sorted(flat[:10]) == list(range(10))
    assert sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new order each pass
    assert epochs[2] == flat[8:12]  # the epoch straddling two passes takes the end of one and the start of the next


def test_same_seed_same_draw_and_whole_pool_when_none():
    assert draw_indices(50, 8, 3, seed=7) == draw_indices(50, 8, 3, seed=7)
    assert draw_indices(50, 8, 3, seed=7) != draw_indices(50, 8, 3, seed=8)
    assert sorted(draw_indices(6, None, 0, seed=0)) == list(range(6))


def test_shard_is_equal_and_disjoint():
    items = list(range(11))
    shares = [shard(items, r, 2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert not set(shares[0]) & set(shares[1])
