"""Interruptions and checkpoints through the real CLI: a kill during a save, a resume with nothing or a broken file
to resume from, a changed config, Ctrl-C and SIGTERM in the rollout and in training."""

import csv
import json
import shutil
import signal

import pytest
import torch

from sppo_lightning.checkpoints import AtomicCheckpointIO, is_complete
from tests.test_cli import DEMO, REPO, run, val_accuracies

TINY = [
    "--config", DEMO, "--data.prompts_per_epoch=16", "--data.val.init_args.num_prompts=50", "--data.val_batch_size=50",
    "--trainer.enable_progress_bar=false",
]  # fmt: skip


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """The kill is a KeyboardInterrupt raised after part of the file is written; the old file stays as it was."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 0, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    def killed(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before and is_complete(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left beside it
    assert not is_complete(_truncated_copy(path, tmp_path / "cut.ckpt"))


def _truncated_copy(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_resume_from_last_with_no_checkpoint_is_refused(tmp_path):
    proc = run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--ckpt_path=last: no checkpoint in {tmp_path}/checkpoints, nothing to resume" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing trained from scratch


@pytest.mark.slow
def test_resume_skips_a_truncated_checkpoint_or_says_none_is_complete(one_iteration, tmp_path):
    shutil.copytree(one_iteration, tmp_path, dirs_exist_ok=True)
    ckpts = tmp_path / "checkpoints"
    [done] = [p for p in ckpts.glob("epoch=*.ckpt")]
    # what a kill during the next save left with an older Lightning: a newer, truncated file, and last.ckpt on it
    cut = _truncated_copy(done, ckpts / "epoch=1-step=8.ckpt")
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").symlink_to(cut.name)
    proc = run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", "--ckpt_path=last")
    assert f"skipped {cut}: incomplete" in proc.stderr and f"resuming from {done}" in proc.stderr
    assert len(val_accuracies(tmp_path)) == 3  # before, after iteration 1, after iteration 2 (resumed)

    for path in ckpts.glob("epoch=*.ckpt"):  # now every checkpoint is broken
        _truncated_copy(path.resolve(), path.resolve())
    proc = run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=3", "--ckpt_path=last",
               check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--ckpt_path=last: no complete checkpoint in" in proc.stderr


@pytest.mark.slow
def test_resume_names_changed_settings_and_refuses_another_model(one_iteration, tmp_path, toy_model_dir):
    shutil.copytree(one_iteration, tmp_path, dirs_exist_ok=True)
    proc = run(
        "fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", "--ckpt_path=last",
        "--model.eta=0.5", "--data.temperature=0.9",
    )  # fmt: skip
    assert "model.eta 2.0 -> 0.5" in proc.stderr and "data.temperature 1.0 -> 0.9" in proc.stderr
    assert "learning_rate" not in proc.stderr  # only what changed

    other = tmp_path / "wider"
    shutil.copytree(toy_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    proc = run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", "--ckpt_path=last",
               f"--model.model_name_or_path={other}", check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"holds another model than model.model_name_or_path={other}" in proc.stderr


def interrupting(where: str, name: str) -> list[str]:
    """Overrides that send the process signal ``name`` in iteration 1: during its rollout (the engine signals) or as
    its first training step starts (a callback)."""
    if where == "rollout":
        return ["--data.engine=tests.fixtures.interrupting.SignallingEngine",
                f"--data.engine.init_args.signal_name={name}", "--data.engine.init_args.at_epoch=1",
                "--data.engine.init_args.logprobs_from_rollout=true"]  # fmt: skip
    return ["--trainer.callbacks+=tests.fixtures.interrupting.SignalInTraining",
            f"--trainer.callbacks.init_args.signal_name={name}",
            "--trainer.callbacks.init_args.at_epoch=1"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("where", ["rollout", "training"])
@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_stops_with_the_resume_hint_and_keeps_the_last_iteration(tmp_path, where, name, code):
    proc = run("fit", *TINY, *interrupting(where, name), f"--trainer.default_root_dir={tmp_path}",
               "--trainer.max_epochs=3", check=False)  # fmt: skip
    assert proc.returncode == code == 128 + getattr(signal, name), proc.stderr[-2000:]
    assert "resume with --ckpt_path=last" in proc.stderr and "Traceback" not in proc.stderr
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    # Ctrl-C stops at once (in the rollout or in the step): iteration 0 is the last finished one. SIGTERM stops at
    # the next step boundary, which with one micro-batch per iteration is the end of iteration 1, saved first.
    assert last == {"SIGINT": 0, "SIGTERM": 1}[name]
    assert not (tmp_path / "hf_model").exists()
    run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", f"--trainer.max_epochs={last + 2}", "--ckpt_path=last")
    assert len(val_accuracies(tmp_path)) == last + 3  # before any update, then once per iteration, none twice


@pytest.mark.slow
def test_runs_in_one_folder_keep_their_own_outputs_and_a_resume_reports_the_whole_run(tmp_path):
    """A printed config rerun elsewhere keeps the whole run there; a second run in the same folder owns last.ckpt
    (no stale last-v1.ckpt), its samples say which run they are from; its resume reports from its own beginning."""
    printed = run("fit", *TINY, f"--trainer.default_root_dir={tmp_path / 'printed'}", "--print_config").stdout
    (tmp_path / "my.yaml").write_text(printed)
    root = tmp_path / "runs"
    mine = ["--config", str(tmp_path / "my.yaml"), f"--trainer.default_root_dir={root}"]
    run("fit", *mine, "--trainer.max_epochs=2")
    assert not (tmp_path / "printed").exists()  # nothing of the run went to the folder the config was printed for
    assert (root / "logs" / "version_0" / "metrics.csv").is_file()
    run("fit", *mine, "--trainer.max_epochs=1", "--model.eta=1.0")  # a new run, same folder

    ckpts = root / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("last*")) == ["last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0 and last["hyper_parameters"]["eta"] == 1.0  # the newest run's
    samples = [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()]
    assert [s["run"] for s in samples] == ["logs/version_0"] * 16 + ["logs/version_1"] * 8

    out = run("fit", *mine, "--trainer.max_epochs=2", "--model.eta=1.0", "--ckpt_path=last").stdout
    with (root / "logs" / "version_1" / "metrics.csv").open() as f:
        first = next(float(r["val/accuracy"]) for r in csv.DictReader(f) if r.get("val/accuracy"))
    last_acc = val_accuracies(root / "logs" / "version_2")[-1]
    assert "SPPO: 2 iterations (resumed)" in out
    assert f"{first:.1%} -> {last_acc:.1%}" in out  # from the second run's start, not the first run's, nor iteration 1


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory):
    """A run stopped after its first iteration (16 prompts drawn of the toy pool, one optimizer step)."""
    root = tmp_path_factory.mktemp("one_iteration")
    run("fit", *TINY, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1")
    return root


def _resume(saved, tmp_path, *changes, env=None):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    return run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", "--ckpt_path=last",
               *changes, check=False, env=env)  # fmt: skip


REFUSED = {  # what changes, the message naming it saved -> now, whether SPPO_RESUME_CHANGED=1 may go on anyway
    # the optimizer's parameter groups: torch refused the saved state with a traceback
    "groups": (["--model.weight_decay_on=all"], "model.weight_decay_on 'matrices' -> 'all' (other optimizer "
               "parameter groups", False),
    # one process -> FSDP2 on two: torch's resharding died with a traceback
    "layout": (["--config", str(REPO / "configs" / "fsdp_cpu.yaml")], "trainer.strategy 'SingleDeviceStrategy' -> "
               "'ModelParallelStrategy'; trainer.world_size 1 -> 2", False),
    # the scheduler's count of steps read as a count of rollouts: it resumed silently with another learning rate
    "warmup unit": (["--model.warmup_unit=rollout", "--model.warmup_steps=4"], "model.warmup_unit 'step' -> "
                    "'rollout'", True),
    # the draw's position (iterations x prompts) jumps: it resumed silently, skipping prompts
    "prompts per iteration": (["--data.prompts_per_epoch=32"], "data.prompts_per_epoch 16 -> 32", True),
    # another order of the same pass: it resumed silently, repeating prompts already drawn
    "draw seed": (["--data.seed=3"], "data.seed 0 -> 3", True),
    # another pool: it resumed silently in the middle of the new pool's first pass
    "prompt pool": (["--data.train.init_args.num_prompts=500"], "data.train.init_args.num_prompts None -> 500", True),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED))
def test_resume_refuses_a_change_that_breaks_it(one_iteration, tmp_path, case):
    changes, named, may_go_on = REFUSED[case]
    proc = _resume(one_iteration, tmp_path, *changes)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "cannot be resumed with these changed settings: " + named in line
    assert "resume with the saved values, or start a new run from its weights (python -m sppo_lightning.export" in line
    assert ("set SPPO_RESUME_CHANGED=1 to go on" in line) == may_go_on
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0 and len(val_accuracies(tmp_path)) == 2  # nothing trained


@pytest.mark.slow
def test_a_resume_goes_on_anyway_when_asked_and_takes_a_changed_learning_rate(one_iteration, tmp_path):
    """SPPO_RESUME_CHANGED=1 turns a redrawing change into a warning; a changed learning rate, weight decay or betas
    is used from the resumed iteration on (Lightning restored the checkpoint's into the optimizer and kept them)."""
    import os

    env = {**os.environ, "SPPO_RESUME_CHANGED": "1"}
    proc = _resume(one_iteration, tmp_path, "--data.seed=3", "--model.learning_rate=3e-4", "--model.weight_decay=0.1",
                   "--model.adam_betas=[0.8,0.9]", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    named = "model.adam_betas [0.9, 0.999] -> [0.8, 0.9]; model.learning_rate 0.0001 -> 0.0003; model.weight_decay"
    assert f"with changed settings: {named} 0.0 -> 0.1; data.seed 0 -> 3" in proc.stderr
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1
    decayed, spared = last["optimizer_states"][0]["param_groups"]
    assert decayed["lr"] == spared["lr"] == 3e-4 and last["lr_schedulers"][0]["base_lrs"] == [3e-4, 3e-4]
    assert (decayed["weight_decay"], spared["weight_decay"]) == (0.1, 0.0)
    assert decayed["betas"] == spared["betas"] == (0.8, 0.9)


@pytest.mark.slow
@pytest.mark.parametrize("at_epoch", [1, 0])
def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_last_complete_iteration(tmp_path, at_epoch):
    """``train.py`` SIGKILLed half-way through writing iteration ``at_epoch``'s checkpoint: last.ckpt still points at
    the one before (or there is none, and a resume says so); the resumed run ends where an uninterrupted one does,
    with the same weights and accuracies."""
    import subprocess
    import sys
    import time

    killed = tmp_path / "killed"
    stall = ["--trainer.callbacks+=tests.fixtures.interrupting.StallingSave",
             f"--trainer.callbacks.init_args.at_epoch={at_epoch}"]  # fmt: skip
    args = [sys.executable, str(REPO / "train.py"), "fit", *TINY, f"--trainer.default_root_dir={killed}"]
    proc = subprocess.Popen([*args, "--trainer.max_epochs=3", *stall], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    flag, deadline = killed / "save-stalled", time.monotonic() + 540
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()  # SIGKILL, as the OOM killer or a scheduler's hard stop: no handler runs
    stderr = proc.communicate()[1]
    assert flag.exists(), stderr[-2000:]
    ckpts = killed / "checkpoints"
    [partial] = ckpts.glob(".*.partial")
    assert partial.name == f".epoch={at_epoch}-step={at_epoch + 1}.ckpt.partial"
    assert partial.stat().st_size == int(flag.read_text()) and not is_complete(partial)  # caught half-way
    last = ckpts / "last.ckpt"
    if at_epoch == 0:
        assert not last.exists()
    else:  # the link still points at the previous iteration's whole file
        assert last.resolve().name == "epoch=0-step=1.ckpt" and is_complete(last.resolve())

    resume = run("fit", *TINY, f"--trainer.default_root_dir={killed}", "--trainer.max_epochs=3", "--ckpt_path=last",
                 check=False)  # fmt: skip
    if at_epoch == 0:
        assert resume.returncode == 2 and "Traceback" not in resume.stderr
        assert f"no checkpoint in {ckpts} (only {partial.name}, left by an interrupted save: no iteration is " in (
            resume.stderr
        )
        return
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert f"Restoring states from the checkpoint path at {ckpts / 'epoch=0-step=1.ckpt'}" in resume.stdout + (
        resume.stderr
    )
    whole = tmp_path / "whole"
    run("fit", *TINY, f"--trainer.default_root_dir={whole}", "--trainer.max_epochs=3")
    assert val_accuracies(killed / "logs" / "version_1") == val_accuracies(whole)[2:]  # iterations 1 and 2
    mine, theirs = (torch.load(p / "checkpoints" / "last.ckpt", weights_only=False) for p in (killed, whole))
    assert mine["epoch"] == theirs["epoch"] == 2
    assert all(torch.equal(mine["state_dict"][k], v) for k, v in theirs["state_dict"].items())


def test_a_given_checkpoint_that_is_missing_or_truncated_is_refused(tmp_path):
    missing = tmp_path / "checkpoints" / "epoch=3-step=4.ckpt"
    proc = run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={missing}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --ckpt_path={missing}: no such file or folder" in proc.stderr.splitlines()

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(b"PK\x03\x04 the first bytes of a checkpoint")  # a save cut short by an older version
    proc = run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={cut}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --ckpt_path={cut}: the checkpoint is incomplete (its save was interrupted)" in (
        proc.stderr.splitlines()
    )
    assert not (tmp_path / "checkpoints").exists()  # nothing trained from scratch


@pytest.mark.slow
def test_a_resume_from_a_named_file_runs_the_given_config_like_last(one_iteration, tmp_path):
    """Lightning put a named checkpoint's saved model settings over the command line: --model.eta=0.5 was dropped
    without a word (with --ckpt_path=last it was kept), and a refused change went through."""
    shutil.copytree(one_iteration, tmp_path, dirs_exist_ok=True)
    named = str((tmp_path / "checkpoints" / "last.ckpt").resolve())
    args = ["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", f"--ckpt_path={named}"]
    proc = run(*args, "--model.weight_decay_on=all", check=False)
    assert proc.returncode == 2 and "model.weight_decay_on 'matrices' -> 'all'" in proc.stderr
    proc = run(*args, "--model.eta=0.5")
    assert "with changed settings: model.eta 2.0 -> 0.5" in proc.stderr
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last["hyper_parameters"]["eta"] == 0.5


def test_a_resumed_optimizer_takes_the_configured_settings_at_the_schedules_position():
    """Saved: lr 1e-4, no decay, 4-step warm-up, 2 steps taken. Configured now: lr 3e-4, decay 0.1. After the restore
    the moments and the position are the checkpoint's, the settings the config's: lr = 3e-4 x 3/4 at step index 2."""
    from types import SimpleNamespace

    from sppo_lightning.checkpoints import RunRecord
    from sppo_lightning.optim import warmup_factor

    def build(lr, decay):
        w = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([{"params": [w], "weight_decay": decay}], lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: warmup_factor(k, 4, "step"))
        return w, optimizer, scheduler

    w, optimizer, scheduler = build(1e-4, 0.0)
    for _ in range(2):
        w.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()

    _, optimizer, scheduler = build(3e-4, 0.1)
    trainer = SimpleNamespace(optimizers=[optimizer], lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
                              ckpt_path="last.ckpt")  # fmt: skip
    record = RunRecord()
    record.on_fit_start(trainer, None)
    optimizer.load_state_dict(saved[0])  # what Lightning's restore does
    scheduler.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 3 / 4)  # the checkpoint's settings won
    record.on_train_start(trainer, None)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(3e-4 * 3 / 4) and group["weight_decay"] == 0.1
    assert scheduler.base_lrs == [3e-4] and scheduler.last_epoch == 2 and scheduler.get_last_lr() == [group["lr"]]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved[0]["state"][0]["exp_avg"])


@pytest.mark.slow
def test_sharded_checkpoints_are_refused_by_one_process(tmp_path):
    """FSDP2's shards (a folder) resumed by a single process: refused naming the layout, where Lightning raised
    IsADirectoryError; the folder's meta.pt holds the record the check reads."""
    run("fit", *TINY, "--config", str(REPO / "configs" / "fsdp_cpu.yaml"), f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1", ranks=2)  # fmt: skip
    assert (tmp_path / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    proc = run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", "--ckpt_path=last",
               check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "trainer.strategy 'ModelParallelStrategy' -> 'SingleDeviceStrategy'; trainer.world_size 2 -> 1" in (
        proc.stderr
    )
