"""Interruptions and checkpoints through the real CLI: a kill during a save, a resume with nothing or a broken file
to resume from, a changed config, Ctrl-C and SIGTERM in the rollout and in training."""

import csv
import json
import shutil
import signal

import pytest
import torch

from sppo_lightning.checkpoints import AtomicCheckpointIO, is_complete
from tests.test_cli import DEMO, run, val_accuracies

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
def test_resume_skips_a_truncated_checkpoint_or_says_none_is_complete(tmp_path):
    run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1")
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
def test_resume_names_changed_settings_and_refuses_another_model(tmp_path, toy_model_dir):
    run("fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1")
    proc = run(
        "fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", "--ckpt_path=last",
        "--model.eta=0.5", "--data.seed=3",
    )  # fmt: skip
    assert "model.eta 2.0 -> 0.5" in proc.stderr and "data.seed 0 -> 3" in proc.stderr
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


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_the_rollout_stops_with_the_resume_hint_and_keeps_the_last_iteration(tmp_path, name, code):
    engine = ["--data.engine=tests.fixtures.interrupting.SignallingEngine",
              f"--data.engine.init_args.signal_name={name}", "--data.engine.init_args.at_epoch=1",
              "--data.engine.init_args.logprobs_from_rollout=true"]  # fmt: skip
    proc = run("fit", *TINY, *engine, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=3", check=False)
    assert proc.returncode == code == 128 + getattr(signal, name), proc.stderr[-2000:]
    assert "resume with --ckpt_path=last" in proc.stderr and "Traceback" not in proc.stderr
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    # Ctrl-C stops at once: iteration 0 is the last finished one. SIGTERM stops at the next step boundary, which with
    # one micro-batch per iteration is the end of iteration 1, saved first.
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
