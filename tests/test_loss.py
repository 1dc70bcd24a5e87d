"""Loss values against arithmetic written out by hand."""

import math

import pytest
import torch

from sppo_lightning.loss import (
    dpo_loss,
    ipo_loss,
    softmean,
    softmean_targets,
    sppo_loss,
    sppo_pair_loss,
    sppo_target_loss,
    trust_region_logps,
)


def test_sppo_loss_by_hand():
    policy = torch.tensor([-1.0, -2.0, -3.0])
    ref = torch.tensor([-1.5, -2.0, -2.0])
    win = torch.tensor([1.0, 0.5, 0.25])
    eta = 2.0
    # log-ratios 0.5, 0, -1; targets 2*(0.5) = 1, 0, 2*(-0.25) = -0.5
    expected = torch.tensor([(0.5 - 1.0) ** 2, 0.0, (-1.0 + 0.5) ** 2])
    out = sppo_loss(policy, ref, win, eta)
    assert out.shape == (3,)  # no reduction
    torch.testing.assert_close(out, expected)


def test_sppo_loss_is_zero_when_the_log_ratio_hits_the_target():
    ref = torch.tensor([-4.0, -6.0])
    win = torch.tensor([0.875, 0.375])
    eta = 4.0
    policy = ref + eta * (win - 0.5)
    torch.testing.assert_close(sppo_loss(policy, ref, win, eta), torch.zeros(2))


def test_sppo_pair_loss_is_the_mean_of_both_squared_terms():
    out = sppo_pair_loss(
        policy_chosen_logps=torch.tensor([-1.0]),
        policy_rejected_logps=torch.tensor([-3.0]),
        ref_chosen_logps=torch.tensor([-2.0]),
        ref_rejected_logps=torch.tensor([-2.0]),
        chosen_win_rates=torch.tensor([0.8]),
        rejected_win_rates=torch.tensor([0.3]),
        eta=1.0,
    )
    chosen = (1.0 - 0.3) ** 2  # log-ratio 1, target 0.3
    rejected = (-1.0 + 0.2) ** 2  # log-ratio -1, target -0.2
    torch.testing.assert_close(out, torch.tensor([(chosen + rejected) / 2]))


def test_softmean_by_hand_and_limits():
    x = torch.tensor([0.0, 1.0])
    beta = 2.0
    expected = math.log((math.exp(0.0) + math.exp(2.0)) / 2) / 2
    assert softmean(x, beta).item() == pytest.approx(expected, rel=1e-6)
    assert softmean(x, 0.0).item() == pytest.approx(0.5)  # arithmetic mean at beta = 0
    assert softmean(x, 1e4).item() == pytest.approx(1.0, abs=1e-3)  # the max for large beta, and stable
    assert softmean(x, 1e-6).item() == pytest.approx(0.5, abs=1e-5)  # continuous at 0


def test_softmean_along_dim():
    x = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    out = softmean(x, 1.0, dim=-1)
    torch.testing.assert_close(out[1], torch.tensor(2.0))
    assert out.shape == (2,)


def test_softmean_targets_use_one_batch_wide_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    eta = 1.0
    baseline = math.log((2 * math.e + 2) / 4)  # (1/1) * log mean exp(r)
    expected = torch.tensor([1 - baseline, -baseline, -baseline, 1 - baseline])
    torch.testing.assert_close(softmean_targets(rewards, eta), expected)
    # With a pool (all ranks' rewards) the baseline comes from the pool.
    pool = torch.tensor([0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(softmean_targets(rewards, eta, pool=pool), rewards)


def test_target_loss_equals_sppo_loss_with_eta_times_win_rate():
    policy, ref, win = torch.randn(5), torch.randn(5), torch.rand(5)
    torch.testing.assert_close(sppo_target_loss(policy, ref, 3.0 * (win - 0.5)), sppo_loss(policy, ref, win, 3.0))


def test_trust_region_holds_back_only_tokens_past_the_clip_in_their_rows_direction():
    ref = torch.tensor([[-1.0, -2.3, -0.2], [-1.0, -0.7, -0.4]])
    token_logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -0.3]], requires_grad=True)
    # row 0: log-ratios (0, +0.3, -0.3), sum 0 < target 1, pushed up: the +0.3 token is past log 1.2 = 0.18;
    #   the -0.3 token is past log 0.8 too, but on the side the row moves away from, so it keeps its gradient.
    # row 1: log-ratios (0, -0.3, +0.1), sum -0.2 > target -1, pushed down: the -0.3 token is past log 0.8.
    logps, held = trust_region_logps(token_logps, ref, torch.tensor([1.0, -1.0]), clip_ratio=0.2)
    torch.testing.assert_close(logps, token_logps.sum(-1))  # the value is the plain sum
    assert held.tolist() == [[False, True, False], [False, True, False]]
    logps.sum().backward()
    assert token_logps.grad.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]


def test_trust_region_holds_nothing_back_at_pi_t():
    """At the first step of an iteration the policy is π_t: every ratio is 1, and the loss is the paper's."""
    ref = torch.randn(4, 5)
    _, held = trust_region_logps(ref.clone(), ref, torch.randn(4), clip_ratio=0.01)
    assert not held.any()


def test_dpo_loss_by_hand():
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    margin = (1.0) - (-1.0)
    torch.testing.assert_close(out, torch.tensor([math.log1p(math.exp(-0.5 * margin))]))
    # At the reference point the loss is log 2 whatever beta.
    zero = dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1)
    assert zero.item() == pytest.approx(math.log(2))


def test_ipo_loss_by_hand():
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; tau = 0.25: target 1/(2 * 0.25) = 2, so the loss is 0
    args = (
        torch.tensor([-1.0, -1.0]),
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.0, -2.0]),
    )
    out = ipo_loss(*args, tau=0.25)
    # second row: h = 1 - 0 = 1, (1 - 2)^2 = 1
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0]))
    # At the reference point h = 0: (0 - 1/(2 tau))^2 = 1/(4 tau^2) = 25 at tau = 0.1
    zero = ipo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), tau=0.1)
    assert zero.item() == pytest.approx(25.0)


def test_ipo_regresses_the_margin_and_stops_where_dpo_keeps_pushing():
    """Beyond the margin 1/(2τ), IPO pulls the winner back down; DPO's gradient still raises it."""
    chosen = torch.tensor([5.0], requires_grad=True)  # margin 5 > 1/(2 * 0.5) = 1
    ipo_loss(chosen, torch.zeros(1), torch.zeros(1), torch.zeros(1), tau=0.5).sum().backward()
    assert chosen.grad.item() == pytest.approx(2 * (5.0 - 1.0))  # > 0: descent lowers the margin
    chosen.grad = None
    dpo_loss(chosen, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.5).sum().backward()
    assert chosen.grad.item() < 0


def test_gradient_pushes_winners_up_and_losers_down():
    policy = torch.zeros(2, requires_grad=True)
    sppo_loss(policy, torch.zeros(2), torch.tensor([0.9, 0.1]), eta=1.0).sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # gradient descent raises the winner's log-prob


# ------------------------------------------------------------------------------------ the loss types' entries
def terms(logps, ref, targets=(0.0, 0.0), n_tokens=(1.0, 1.0), paired=False):
    from sppo_lightning.loss import LossTerms

    values = [torch.as_tensor(v) for v in (logps, ref, targets, n_tokens)]
    return LossTerms(*(v.reshape(-1, 2) if paired else v for v in values))


def test_every_loss_type_has_an_entry_and_the_lists_are_read_off_it():
    from sppo_lightning.loss import LOSS_TYPES, LOSSES, PAIR_LOSSES

    assert LOSS_TYPES == ("sppo", "sppo_pair", "sppo_softmean", "dpo", "ipo", "inpo", "dno") == tuple(LOSSES)
    assert PAIR_LOSSES == ("sppo_pair", "dpo", "ipo")
    assert {n: s.min_samples for n, s in LOSSES.items()} == {
        "sppo": 2, "sppo_pair": 2, "sppo_softmean": 1, "dpo": 2, "ipo": 2, "inpo": 2, "dno": 2
    }  # fmt: skip
    assert [n for n, s in LOSSES.items() if s.skips_ties] == ["dpo", "ipo"]
    assert [n for n, s in LOSSES.items() if s.clip] == ["sppo", "sppo_pair", "sppo_softmean"]
    assert [n for n, s in LOSSES.items() if s.target is None] == ["dpo", "ipo", "inpo", "dno"]


def test_targets_of_the_entries_by_hand():
    from sppo_lightning.loss import LOSSES

    rewards, win = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.75, 0.25]])
    for name in ("sppo", "sppo_pair"):  # η(P̂ − ½), η = 2: 2 * 0.25, 2 * -0.25
        assert LOSSES[name].target(rewards, win, 2.0, None).tolist() == [[0.5, -0.5]]
    # η(r − SoftMean_η(r)) over the pool (0, 0, 2, 2) at η = 1: SoftMean = log((2 + 2e²) / 4)
    baseline = math.log((2 + 2 * math.exp(2.0)) / 4)
    got = LOSSES["sppo_softmean"].target(rewards, win, 1.0, torch.tensor([0.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(got, torch.tensor([[1 - baseline, -baseline]]))


def test_sppo_entries_by_hand():
    from sppo_lightning.loss import LOSSES, LossParams

    # log-ratios 0.5 and -1; targets 1 and -0.5: (0.5 - 1)² = 0.25, (-1 + 0.5)² = 0.25
    x = terms([-1.0, -3.0], [-1.5, -2.0], [1.0, -0.5])
    for name in ("sppo", "sppo_softmean"):
        torch.testing.assert_close(LOSSES[name].compute(x, LossParams()), torch.tensor([0.25, 0.25]))
    # sppo_pair: one pair (winner -1 vs π_t -2: log-ratio 1, target 0.3; loser: -1, target -0.2)
    x = terms([-1.0, -3.0], [-2.0, -2.0], [0.3, -0.2], paired=True)
    expected = ((1.0 - 0.3) ** 2 + (-1.0 + 0.2) ** 2) / 2
    torch.testing.assert_close(LOSSES["sppo_pair"].compute(x, LossParams()), torch.tensor([expected]))


def test_dpo_and_ipo_entries_by_hand():
    from sppo_lightning.loss import LOSSES, LossParams

    # margin (-1 - -2) - (-3 - -2) = 2: DPO at β = 0.5 is log(1 + e^{-1}) = −log σ(1)
    x = terms([-1.0, -3.0], [-2.0, -2.0], paired=True)
    got = LOSSES["dpo"].compute(x, LossParams(dpo_beta=0.5))
    torch.testing.assert_close(got, torch.tensor([math.log1p(math.exp(-1.0))]))
    # IPO on per-token averages: winner 4 tokens at log-ratio 0.3 each, loser 2 at -0.1: h = 0.3 + 0.1 = 0.4,
    # (0.4 - 1/(2 * 0.25))² = (0.4 - 2)² = 2.56 (summed log-ratios would give h = 1.4)
    x = terms([-2.8, -2.2], [-4.0, -2.0], n_tokens=[4.0, 2.0], paired=True)
    torch.testing.assert_close(LOSSES["ipo"].compute(x, LossParams(ipo_tau=0.25)), torch.tensor([2.56]))


def test_sppo_entries_train_on_the_targets_to_the_last_bit_of_the_contract_functions():
    """The step now regresses onto the batch's targets η(P̂ − ½) (computed once, in the pipeline); the values are
    the contract functions' exactly, not approximately."""
    from sppo_lightning.loss import LOSSES, LossParams, win_rate_targets

    g = torch.Generator().manual_seed(0)
    logps, ref = -10 * torch.rand(64, generator=g), -10 * torch.rand(64, generator=g)
    win, eta = torch.rand(64, generator=g), 3.7
    targets = win_rate_targets(None, win, eta)
    got = LOSSES["sppo"].compute(terms(logps, ref, targets, torch.ones(64)), LossParams())
    assert torch.equal(got, sppo_loss(logps, ref, win, eta))
    pair = LOSSES["sppo_pair"].compute(terms(logps, ref, targets, torch.ones(64), paired=True), LossParams())
    expected = sppo_pair_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], win[0::2], win[1::2], eta)
    assert torch.equal(pair, expected)
