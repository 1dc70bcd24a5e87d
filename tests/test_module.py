"""The module: response-only log-probs, π_t log-probs equal to the policy's before the first update, losses."""

import lightning as L
import torch

from sppo_lightning.data.batching import collate
from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.data.examples import Example
from sppo_lightning.module import SPPOModule, sequence_logps


def test_sequence_logps_sums_response_tokens_only(tiny_model_dir):
    module = SPPOModule(str(tiny_model_dir))
    module.configure_model()
    rows = [Example([1, 20, 21], [30, 31, 2], 1.0, 0.75, 0.0, 0), Example([1, 22], [33, 2], 0.0, 0.25, 0.0, 0)]
    b = collate(rows, pad_id=0)
    got = sequence_logps(module.policy, b["input_ids"], b["attention_mask"], b["response_mask"])
    with torch.no_grad():
        for i, row in enumerate(rows):  # by hand, one unpadded row at a time
            ids = torch.tensor([row.prompt_ids + row.response_ids])
            logp = module.policy(ids).logits.log_softmax(-1)[0]
            n_prompt = len(row.prompt_ids)
            expected = sum(logp[t - 1, ids[0, t]] for t in range(n_prompt, ids.shape[1]))
            torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)


def test_ref_logps_equal_the_policy_before_the_first_step(toy_model_dir):
    """The cached π_t log-probs are the policy's own on the very batches training sees: log-ratio 0 at step 1."""
    from sppo_lightning.toy import AdditionPrompts

    L.seed_everything(0)
    module = SPPOModule(str(toy_model_dir), loss_type="sppo", eta=1.0, learning_rate=1e-3)
    data = RolloutDataModule(
        train=AdditionPrompts("train", num_prompts=16),
        prompts_per_epoch=8,
        samples_per_prompt=4,
        max_response_length=12,
        micro_batch_size=16,
    )
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                seen.append((pl_module.sequence_logps(batch), batch["ref_logps"].clone()))

    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        reload_dataloaders_every_n_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Probe()],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    assert len(seen) == 2  # 8 prompts x 4 samples / 16 rows
    policy, ref = seen[0]
    torch.testing.assert_close(policy, ref, atol=1e-6, rtol=0)  # before any update
    policy, ref = seen[1]
    assert (policy - ref).abs().max() > 1e-4  # after one update the policy has moved away from π_t
