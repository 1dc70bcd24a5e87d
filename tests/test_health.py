"""A run that checks itself (sppo_lightning/health.py): the sampler-vs-trainer log-prob gap and its guard, entropy,
KL and truncation, as pure functions with hand-computed values, then through real fits with the HF engine and the
SGLang stand-ins (colocated and server) that report log-probs as SGLang 0.5.23 does."""

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from sppo_lightning import health
from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.health import GapGuard, LogprobGapError
from sppo_lightning.logprobs import collecting_entropy, response_token_logps
from sppo_lightning.module import SPPOModule
from sppo_lightning.rollout.hf import HFEngine
from sppo_lightning.rollout.sglang import SGLangEngine, SGLangServerEngine
from sppo_lightning.toy import AdditionPrompts
from tests.rollout import sglang_standin
from tests.rollout.sglang_source import released

HEALTH = ("train/entropy", "train/kl_pi_t", "train/kl_initial", "rollout/truncated_share", "rollout/logprob_gap_mean")


# ------------------------------------------------------------------------------------------- pure functions
def test_gap_is_the_mean_and_max_absolute_difference_over_real_tokens():
    sampler = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.5, -1.0, 0.0], [-0.25, 0.0, 0.0]])
    valid = health.valid_columns(torch.tensor([2, 1]), sampler)  # the -9 is padding: not counted
    sums = health.gap_sums(sampler, trainer, valid)
    assert sums.tolist() == [0.5 + 1.0 + 0.25, 3.0, 1.0]
    other_rank = torch.tensor([0.25, 1.0, 0.25])
    mean, largest = health.combine_gap(torch.stack([sums, other_rank]))
    assert mean == pytest.approx(2.0 / 4) and largest == 1.0


def test_entropy_of_uniform_and_one_hot_logits():
    logits = torch.stack([torch.zeros(8), torch.tensor([50.0] + [0.0] * 7), torch.zeros(8)])  # (3, V=8)
    total, count = health.entropy_sums(logits, torch.tensor([1.0, 1.0, 0.0]), chunk=2)
    assert count == 2 and total == pytest.approx(math.log(8), abs=1e-5)  # log V + ~0; the third is masked


def test_k3_is_r_minus_1_minus_log_r_per_token():
    logps, ref = torch.tensor([[math.log(0.5), math.log(0.2)]]), torch.tensor([[math.log(0.25), math.log(0.2)]])
    total, count = health.k3_sums(logps, ref, torch.ones(1, 2, dtype=torch.bool))
    assert count == 2 and total == pytest.approx(2 - 1 - math.log(2))  # r = 2 on the first token, 1 on the second


def test_truncated_share_counts_responses_cut_without_a_stop_token():
    eos = 9
    responses = [[[1, 2, 3], [1, 9]], [[1, 2, 9], [4]]]  # max 3: [1,2,3] cut; [1,2,9] ended on its last token
    assert health.truncated_share(responses, 3, {eos}) == 0.25


def test_the_guard_warns_once_above_warn_and_stops_above_stop():
    guard = GapGuard(warn=0.1, stop=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.check(0.05, 3.0, "iteration 0", "X")  # a large max alone (one rare token in bf16) is no alarm
    with pytest.warns(UserWarning, match=r"0.2 nats.*weights were not pushed") as record:
        guard.check(0.2, 3.0, "iteration 0", "X")
    assert len(record) == 1
    with pytest.raises(LogprobGapError, match=r"iteration 3: .* 0.8 nats .*logprob_gap_stop=0.5.*--ckpt_path") as e:
        guard.check(0.8, 7.0, "iteration 3", "SGLangEngine")
    assert "\n" not in str(e.value)
    GapGuard(warn=0, stop=0).check(100.0, 100.0, "iteration 0", "X")  # 0 = off


def test_entropy_is_collected_from_the_forward_that_computes_the_log_probs(tiny_model_dir):
    """train/entropy's sums equal the entropy of a separate full forward over the same response tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 11, 12, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.float32)
    with collecting_entropy() as sink:
        response_token_logps(model, ids, attention, response)
    total, count = torch.stack(sink).sum(0)
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=attention).logits.float().log_softmax(-1)[:, :-1]
    h = -(logp.exp() * logp).sum(-1) * response[:, 1:]  # position t predicts token t + 1
    assert count == 5 and total == pytest.approx(float(h.sum()), rel=1e-5)


# ------------------------------------------------------------------------------------------------ fits
def toy_data(engine, **kw) -> RolloutDataModule:
    return RolloutDataModule(
        train=AdditionPrompts("train", num_prompts=32), val=AdditionPrompts("val", num_prompts=4), engine=engine,
        prompts_per_epoch=4, samples_per_prompt=4, max_response_length=8, micro_batch_size=8, val_batch_size=4, **kw,
    )  # fmt: skip


def fit(tmp_path, model_dir, engine, epochs=2, lr=1e-3, module: dict | None = None, **data) -> list[dict]:
    """A toy fit (4 prompts x 4 samples, 2 steps per iteration) logged to CSV: its metrics.csv rows; ``module``:
    more settings of the SPPOModule."""
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", reload_dataloaders_every_n_epochs=1, logger=CSVLogger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(SPPOModule(str(model_dir), learning_rate=lr, **(module or {})), datamodule=toy_data(engine, **data))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def per_iteration(rows: list[dict], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) and r["epoch"] != "-1"]


def test_health_metrics_once_per_iteration_with_the_hf_engine(tmp_path, toy_model_dir):
    """π_t from a separate forward: the gap is the rounding between generation (KV cache, left padding) and that
    forward; entropy within (0, log V]; both KLs grow from ~0 as the policy moves; one value per iteration each."""
    rows = fit(tmp_path, toy_model_dir, HFEngine(), epochs=2)
    values = {name: per_iteration(rows, name) for name in (*HEALTH, "rollout/logprob_gap_max")}
    assert all(len(v) == 2 for v in values.values()), values
    assert max(values["rollout/logprob_gap_max"]) < 1e-4  # float32 on both sides
    vocab = SPPOModule(str(toy_model_dir)).tokenizer.__len__()
    assert all(0 < h < math.log(vocab) for h in values["train/entropy"])
    assert all(0 <= k < 1.0 for k in values["train/kl_pi_t"] + values["train/kl_initial"])
    assert min(values["train/kl_initial"]) > 1e-5  # lr 1e-3: the policy has left π_0 (0 without a step, below)
    assert all(0 <= s <= 1 for s in values["rollout/truncated_share"])


def test_without_a_step_the_policy_is_pi_t_and_every_kl_is_zero(tmp_path, toy_model_dir):
    """lr 0: π_θ = π_t = π_0 throughout, so both k3 estimates are 0 up to float rounding; π_t from generation's
    logits: the gap is exactly 0 (the sampler's log-probs are π_t's)."""
    rows = fit(tmp_path, toy_model_dir, HFEngine(logprobs_from_rollout=True), epochs=1, lr=0.0)
    assert per_iteration(rows, "rollout/logprob_gap_max") == [0.0]
    assert per_iteration(rows, "train/kl_pi_t")[0] < 1e-6
    assert per_iteration(rows, "train/kl_initial")[0] < 1e-6


def test_kl_metrics_off_runs_no_forward_at_the_iterations_end(tmp_path, toy_model_dir, monkeypatch):
    """``model.kl_metrics=false``: the iteration's end scores nothing (TRL at beta 0 computes no KL either), no
    ``train/kl_*`` value is logged, ``train/entropy`` (from the training forward) still is, and the probe for
    ``train/kl_initial`` is kept, so a run resumed with the KLs on measures against π_0."""
    forwards, at_the_end, modules = [], [], []
    token_logps, iteration_health = SPPOModule.token_logps, SPPOModule.iteration_health

    def counted(self, batch):
        forwards.append(batch)
        return token_logps(self, batch)

    def health_forwards(self):
        modules.append(self)
        before = len(forwards)
        out = iteration_health(self)
        at_the_end.append(len(forwards) - before)
        return out

    monkeypatch.setattr(SPPOModule, "token_logps", counted)
    monkeypatch.setattr(SPPOModule, "iteration_health", health_forwards)
    rows = fit(tmp_path, toy_model_dir, HFEngine(logprobs_from_rollout=True), module={"kl_metrics": False})
    assert at_the_end == [0, 0]
    assert len(forwards) == 4  # the 2 training steps of each of the 2 iterations, nothing else
    assert not any(r.get("train/kl_pi_t") or r.get("train/kl_initial") for r in rows)
    assert len(per_iteration(rows, "train/entropy")) == 2
    saved = {}
    modules[-1].health.save(saved)  # what the checkpoint keeps; a run resumed from it with the KLs on:
    resumed = health.IterationHealth(kl=True)
    resumed.load(saved)
    assert [rows["ref_logps"].shape for rows in resumed.to_score()] == [modules[-1].health.probe["ref_logps"].shape]


@pytest.fixture
def standin(monkeypatch):
    return sglang_standin.install(monkeypatch, released())


def test_colocated_sglang_reports_log_probs_the_trainer_agrees_with(standin, tmp_path, toy_model_dir):
    """SGLang in float32 sampling the pushed policy: the gap is float rounding; SGLang is asked for the
    untempered log-probs (SGLANG_RETURN_ORIGINAL_LOGPROB) and for each sampled token's log-prob, by every rollout and
    by the first batch of every validation pass (one batch each here)."""
    rows = fit(tmp_path, toy_model_dir, SGLangEngine(dtype="float32"), epochs=2)
    assert max(per_iteration(rows, "rollout/logprob_gap_max")) < 1e-4
    (sgl,) = standin.instances
    generate = [c for c in sgl.calls if c.name == "generate"]
    # rollout 0, the validation before the first update, iteration 0's validation, rollout 1, iteration 1's
    assert [c.kwargs["return_logprob"] for c in generate] == [True] * 5
    assert sgl.original_logprob


def test_bf16_sglang_gap_is_bf16_rounding(standin, tmp_path, toy_model_dir):
    """SGLang's default bf16 copy against the float32 trainer: a gap of bf16 rounding, under the warning."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rows = fit(tmp_path, toy_model_dir, SGLangEngine(), epochs=1)
    assert not [w for w in seen if "logprob_gap_warn" in str(w.message)]
    (gap,) = per_iteration(rows, "rollout/logprob_gap_mean")
    assert 1e-4 < gap < health.GAP_WARN, gap


def test_a_skipped_push_after_a_release_stops_the_first_iteration(standin, monkeypatch, tmp_path, toy_model_dir):
    """The bug this project once had: after a memory release SGLang's weights come back undefined and must be pushed
    again. Skipping that push (a fresh engine still gets its first one, for the first rollout) makes every generation
    after the first release sample noise: the validation before the first update, which follows the first rollout's
    release, stops the run before any step is taken."""
    push = SGLangEngine.push_weights
    monkeypatch.setattr(
        SGLangEngine, "push_weights", lambda self, policy: None if self._released else push(self, policy)
    )
    stop = r"^the validation before the first update: the SGLangEngine sampler's .* > data.logprob_gap_stop"
    with pytest.raises(LogprobGapError, match=stop):
        fit(tmp_path, toy_model_dir, SGLangEngine(dtype="float32"), epochs=3)
    calls = [c.name for c in standin.instances[0].calls]
    assert calls.count("end_weight_update") == 1  # the fresh engine's push only
    assert calls.count("generate") == 2  # rollout 0, then the first validation's batch: the run stopped there


def test_a_lower_stop_threshold_stops_a_correct_bf16_run(standin, tmp_path, toy_model_dir):
    """The thresholds are settings: a stop threshold below bf16 rounding stops even a sound run."""
    with pytest.raises(LogprobGapError, match=r"logprob_gap_stop=1e-06"):
        fit(tmp_path, toy_model_dir, SGLangEngine(), epochs=1, logprob_gap_stop=1e-6)


@pytest.mark.parametrize("load_initial_weights", [True, False], ids=["loaded explicitly", "trusted"])
def test_a_server_holding_other_weights_at_step_0(tmp_path, toy_model_dir, tiny_model_dir, load_initial_weights):
    """The client loads the starting policy into the server before its first generation: a server started from
    another checkpoint (a random model with the same tokenizer) then samples the policy (gap ~0). Trusting the server
    instead (``load_initial_weights=False``) stops the run at the first rollout."""
    from tests.rollout.test_sglang import StandInServer

    server = StandInServer(tiny_model_dir, released())
    engine = SGLangServerEngine(
        url=server.url, weights_dir=str(tmp_path / "w"), load_initial_weights=load_initial_weights
    )
    try:
        if load_initial_weights:
            rows = fit(tmp_path, toy_model_dir, engine, epochs=1)
            assert per_iteration(rows, "rollout/logprob_gap_max")[0] < 1e-4
            assert server.requests[0][0] == "/update_weights_from_disk"
            asked = [body.get("return_logprob", False) for path, body in server.requests if path == "/generate"]
            assert asked == [True] * 3  # rollout 0, the validation before the first update, iteration 0's (1 batch)
        else:
            with pytest.raises(LogprobGapError, match="iteration 0"):
                fit(tmp_path, toy_model_dir, engine, epochs=1)
            assert "/update_weights_from_disk" not in [p for p, _ in server.requests]
    finally:
        server.close()


@pytest.mark.slow
def test_the_cli_stops_with_one_line_exit_2_and_last_ckpt_intact(standin, monkeypatch, tmp_path, capsys):
    """The demo through the colocated engine: one sound iteration, then a resume with the re-push after a release
    skipped. The resumed process's fresh engine gets its first push for iteration 1's rollout, which trains; the
    validation after it samples from the released, never re-pushed copy and stops the run with one line and exit 2,
    leaving last.ckpt at the finished iteration 0 and the first run's exported model as it was. (A fresh run with
    the bug stops at the validation before the first update: the test above.)"""
    from sppo_lightning.cli import main
    from tests.test_cli import DEMO

    args = ["fit", "--config", DEMO, "--data.engine=sppo_lightning.rollout.sglang.SGLangEngine",
            "--data.engine.init_args.mem_fraction_static=0.3", "--data.prompts_per_epoch=16",
            "--data.val.init_args.num_prompts=16", "--data.val_batch_size=16", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false"]  # fmt: skip
    main([*args, "--trainer.max_epochs=1"])
    exported = (tmp_path / "hf_model" / "model.safetensors").read_bytes()
    push = SGLangEngine.push_weights
    monkeypatch.setattr(SGLangEngine, "push_weights", lambda self, p: None if self._released else push(self, p))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--trainer.max_epochs=3", "--ckpt_path=last"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "logprob_gap_stop" in x]
    assert line.startswith("error: iteration 1's validation: ") and "--ckpt_path" in line
    # iteration 1's rollout, then its validation: Lightning's request for the finished iteration 0's data on resume
    # gets no rollout
    assert [c.name for c in standin.instances[-1].calls].count("generate") == 2
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0 and last["global_step"] == 1  # 16 prompts x 4 samples = one micro-batch of 64
    assert (tmp_path / "hf_model" / "model.safetensors").read_bytes() == exported
