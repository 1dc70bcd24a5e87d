"""The module: response-only log-probs, π_t log-probs equal to the policy's before the first update, losses."""

import lightning as L
import pytest
import torch

from sppo_lightning.data.batching import collate
from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.data.examples import Example
from sppo_lightning.logprobs import response_token_logps
from sppo_lightning.module import SPPOModule


def test_token_logps_are_the_response_tokens_only_from_column_0(tiny_model_dir):
    module = SPPOModule(str(tiny_model_dir))
    module.configure_model()
    rows = [Example([1, 20, 21], [30, 31, 2], 1.0, 0.75, 0.0, 0), Example([1, 22], [33, 2], 0.0, 0.25, 0.0, 0)]
    b = collate(rows, pad_id=0)
    got = response_token_logps(module.policy, b.input_ids, b.attention_mask, b.response_mask)
    assert got.shape == (2, 3)
    with torch.no_grad():
        for i, row in enumerate(rows):  # by hand, one unpadded row at a time
            ids = torch.tensor([row.prompt_ids + row.response_ids])
            logp = module.policy(ids).logits.log_softmax(-1)[0]
            n_prompt = len(row.prompt_ids)
            expected = torch.zeros(3)  # zero past the response's end
            expected[: len(row.response_ids)] = torch.stack(
                [logp[t - 1, ids[0, t]] for t in range(n_prompt, ids.shape[1])]
            )
            torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)


def fit_one_iteration(module, callback, prompts_per_epoch=16, max_response_length=8, progress_bar=False, **data_kw):
    """One SPPO iteration of the toy task (K = 4, micro-batches of 16 rows) with ``callback`` watching."""
    from sppo_lightning.toy import AdditionPrompts

    data = RolloutDataModule(
        train=AdditionPrompts("train", num_prompts=32),
        prompts_per_epoch=prompts_per_epoch,
        samples_per_prompt=4,
        max_response_length=max_response_length,
        micro_batch_size=16,
        loss_type=module.hparams.loss_type,
        eta=module.hparams.eta,
        **data_kw,
    )
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", reload_dataloaders_every_n_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=progress_bar, limit_val_batches=0, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


def test_shared_prompt_forward_gives_the_plain_forwards_values_and_gradients(tiny_model_dir):
    """Each prompt run once and its rows continued from its KV cache: the same log-probs and the same gradients as
    running every row whole; prompts of different lengths, rows interleaved, responses of 1 to 4 tokens."""
    from sppo_lightning.logprobs import shared_prompt_token_logps

    module = SPPOModule(str(tiny_model_dir))
    module.configure_model()
    policy = module.policy.eval()  # no dropout: the two forwards must see the same function
    a, b, c = [1, 20, 21, 22, 23], [0, 24], [24]  # c: b without its first token, which is the padding id
    rows = [Example(a, [30, 31, 2], 0, 0, 0, 0), Example(b, [33], 0, 0, 0, 7), Example(a, [32, 2], 0, 0, 0, 0),
            Example(b, [34, 35, 36, 2], 0, 0, 0, 7), Example(c, [30, 2], 0, 0, 0, 3),
            Example(a, [30, 2], 0, 0, 0, 0)]  # fmt: skip
    batch = collate(rows, pad_id=0)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 2.0, -1.0])[:, None]  # a loss that weighs every row differently

    def logps_and_grads(fn):
        policy.zero_grad()
        logps = fn()
        (logps * weights).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    plain, plain_grads = logps_and_grads(
        lambda: response_token_logps(policy, batch.input_ids, batch.attention_mask, batch.response_mask)
    )
    shared, shared_grads = logps_and_grads(
        lambda: shared_prompt_token_logps(
            policy, batch.input_ids, batch.attention_mask, batch.response_mask, batch.prompt_lengths
        )
    )
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def watch_one_iteration(toy_model_dir, eta=1.0, clip_ratio=None, **data_kw):
    """Fit one toy iteration (8 prompts x 4 samples, micro-batches of 16 rows) and record, at the start of every
    step, the batch's ids, π_t log-probs and targets and the policy's log-probs at that moment, and after it, the
    share of tokens the trust region held back."""
    L.seed_everything(0)
    module = SPPOModule(str(toy_model_dir), loss_type="sppo", eta=eta, clip_ratio=clip_ratio, learning_rate=1e-3)
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                logps = pl_module.token_logps(batch)
            seen.append({"ids": batch.input_ids.clone(), "ref": batch.ref_logps.clone(),
                         "targets": batch.targets.clone(), "logps": logps})  # fmt: skip

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[-1]["clipped"] = trainer.callback_metrics.get("train/clipped_tokens")

    trainer = fit_one_iteration(module, Probe(), prompts_per_epoch=8, max_response_length=12, **data_kw)
    return trainer, seen


def test_ref_logps_equal_the_policy_before_the_first_step(toy_model_dir):
    """The cached π_t log-probs are the policy's own on the very batches training sees: log-ratio 0 at step 1."""
    _, seen = watch_one_iteration(toy_model_dir)
    assert len(seen) == 2  # 8 prompts x 4 samples / 16 rows
    torch.testing.assert_close(seen[0]["logps"], seen[0]["ref"], atol=1e-6, rtol=0)  # before any update
    assert (seen[1]["logps"] - seen[1]["ref"]).abs().max() > 1e-4  # after one update the policy has moved from π_t


def test_a_second_pass_regresses_onto_the_same_rollout(toy_model_dir):
    """passes_per_rollout=2: twice the optimizer steps on the same rows, whose π_t log-probs and targets stay the
    rollout's while the policy moves on."""
    trainer, seen = watch_one_iteration(toy_model_dir, passes_per_rollout=2)
    assert trainer.global_step == len(seen) == 4  # 2 passes x (8 prompts x 4 samples / 16 rows)
    first_pass = {tuple(step["ids"][0].tolist()): step for step in seen[:2]}
    for step in seen[2:]:
        first = first_pass[tuple(step["ids"][0].tolist())]  # the same micro-batch in the first pass
        for key in ("ids", "ref", "targets"):
            assert torch.equal(step[key], first[key]), key
        assert (step["logps"] - step["ref"]).abs().max() > 1e-4  # the policy is no longer π_t


def test_the_trust_region_holds_back_tokens_only_once_the_policy_has_left_pi_t(toy_model_dir):
    _, seen = watch_one_iteration(toy_model_dir, eta=8.0, clip_ratio=0.2, passes_per_rollout=2)
    clipped = [float(step["clipped"]) for step in seen]
    assert clipped[0] == 0  # the first step is at π_t: the paper's loss
    assert 0 < clipped[-1] < 1  # in the second pass some tokens have moved past 1 ± 0.2, not all


class Poison(L.Callback):
    """NaN in the targets of some micro-batches (a NaN loss), NaN in a gradient after others."""

    def __init__(self, nan_loss_at=(), nan_grad_at=()):
        self.nan_loss_at, self.nan_grad_at, self.seen = set(nan_loss_at), set(nan_grad_at), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen = batch_idx
        if batch_idx in self.nan_loss_at:
            batch.targets[0] = float("nan")  # what every SPPO variant regresses onto

    def on_after_backward(self, trainer, pl_module):
        if self.seen in self.nan_grad_at:
            next(pl_module.policy.parameters()).grad[0, 0] = float("inf")


def test_nan_loss_and_nan_gradient_steps_are_skipped_and_counted(toy_model_dir):
    L.seed_everything(0)
    module = SPPOModule(str(toy_model_dir), learning_rate=1e-3)
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = fit_one_iteration(module, Poison(nan_loss_at={0}, nan_grad_at={2}))
    assert module.guard.skipped_steps == 2  # of 4 micro-batches: one without backward, one whose update was dropped
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    optimizer = trainer.optimizers[0]
    assert {int(s["step"]) for s in optimizer.state.values()} == {2}  # AdamW stepped twice, not four times
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())


def test_nonfinite_steps_in_a_row_stop_the_run_with_one_message(toy_model_dir):
    from sppo_lightning.errors import DivergenceError

    module = SPPOModule(str(toy_model_dir), max_nonfinite_steps=3)
    with pytest.raises(DivergenceError, match="3 steps in a row had a non-finite loss"):
        fit_one_iteration(module, Poison(nan_loss_at={0, 1, 2, 3}))


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_in_the_policy_unless_kept(dropout_model_dir, disable):
    """Generation and the π_t pass run in eval mode, training in train mode: with dropout off (the default) both
    modes compute the same function; with model.disable_dropout=false the model's attention dropout is kept."""
    module = SPPOModule(str(dropout_model_dir), disable_dropout=disable)
    module.configure_model()
    ids = torch.tensor([[1, 20, 21, 22, 23, 30, 31, 2]])
    with torch.no_grad():
        train = module.policy.train()(ids).logits
        evaluated = module.policy.eval()(ids).logits
    assert torch.equal(train, evaluated) == disable


def test_the_first_step_of_a_model_with_dropout_starts_at_pi_t(dropout_model_dir):
    """The cached π_t log-probs and the first training forward agree exactly: train/log_ratio is 0 at step 1."""
    L.seed_everything(0)
    first = {}

    class FirstStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            first.setdefault("log_ratio", float(trainer.callback_metrics["train/log_ratio"]))

    fit_one_iteration(SPPOModule(str(dropout_model_dir), learning_rate=1e-3), FirstStep())
    assert first["log_ratio"] == 0.0


def test_ipo_step_regresses_the_token_averaged_margin(toy_model_dir):
    """loss_type ipo: h = mean over tokens of log π_θ/π_t, winner minus loser (TRL's convention), and the loss is
    (h − 1/(2τ))². π_t is shifted by hand so that every winner token has log-ratio 0.3 and every loser token −0.1."""
    from sppo_lightning.errors import ConfigError

    module = SPPOModule(str(toy_model_dir), loss_type="ipo", ipo_tau=0.25)
    module.configure_model()
    module.log = lambda *args, **kwargs: None  # no trainer here
    rows = [Example([1, 2, 3], [4, 5, 6, 7], 1.0, 0.75, 0.0, 0), Example([1, 2, 3], [8, 9], 0.0, 0.25, 0.0, 0)]
    batch = collate(rows, pad_id=0, paired=True)  # (winner, loser)
    with torch.no_grad():
        logps = module.token_logps(batch)  # (2, 4): the loser's last two columns are padding (0)
    valid = torch.tensor([[1.0] * 4, [1.0, 1.0, 0.0, 0.0]])
    batch.ref_logps = (logps - torch.tensor([[0.3], [-0.1]])) * valid
    loss = module.training_step(batch, 0)
    # h = 0.3 - (-0.1) = 0.4 whatever the lengths (summed, it would be 4 * 0.3 + 2 * 0.1 = 1.4); 1/(2τ) = 2
    assert loss.item() == pytest.approx((0.4 - 2.0) ** 2, rel=1e-4)
    with pytest.raises(ConfigError, match="ipo_tau"):
        SPPOModule(str(toy_model_dir), loss_type="ipo", ipo_tau=0.0)
    with pytest.raises(ConfigError, match="not to loss_type ipo"):
        SPPOModule(str(toy_model_dir), loss_type="ipo", clip_ratio=0.2)
