"""Every script under benchmarks/ runs here at a tiny size, twice in a row into the same folder, and prints its
figures: a benchmark whose construction breaks (a setting linked by the CLI, a renamed option) fails the suite
instead of the README's tables going stale. Values are not checked (they are measurements); names and columns are.

The scripts run in this process (``runpy``, as ``python benchmarks/X.py ARGS`` would, ``__main__`` included) to save
an interpreter start and the imports per run; ``compare_losses.py`` starts ``train.py`` itself (both forked from the
suite's preloaded process, ``tests/forked.py``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from tests import forked

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
HAS_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
NO_TRL = 'TRL is not installed: pip install -e ".[bench]"'


@pytest.fixture
def run_script(monkeypatch, capsys):
    """``run_script(name, *args)``: the script's output (stdout), run as ``__main__`` with ``sys.argv`` set."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.syspath_prepend(str(BENCH))

    def run(name: str, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", [str(BENCH / name), *args])
        try:
            runpy.run_path(str(BENCH / name), run_name="__main__")
        finally:
            torch.set_num_threads(threads)  # some scripts pin 1 thread for fair timing
        return capsys.readouterr().out

    return run


def figures(out: str, pattern: str) -> list[str]:
    return re.findall(pattern, out, flags=re.MULTILINE)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRL, reason=NO_TRL)
def test_vs_trl_prints_its_table_twice(run_script, tmp_path):
    """The second run takes two rounds without a warm-up: the side that runs first alternates (ours, TRL, then TRL,
    ours), and one ratio is printed per round."""
    args = ("--iterations", "1", "--prompts", "16", "--val", "16", "--out", str(tmp_path))
    for rounds, warmup in ((1, 1), (2, 0)):
        out = run_script("vs_trl.py", *args, "--rounds", str(rounds), "--warmup", str(warmup))
        warm = figures(out, r"^warm-up \(--warmup 1\), not counted: ours [\d.]+ s, trl [\d.]+ s$")
        assert len(warm) == warmup, out
        runs = figures(out, r"^round (\d) +(ours|trl): [\d.]+ s for 64 completions, 1 optimizer steps, greedy accuracy")
        assert runs == [("0", "ours"), ("0", "trl"), ("1", "trl"), ("1", "ours")][: 2 * rounds], out
        for side in ("ours", "trl"):
            assert figures(out, rf"^\| {side} \| [\d.]+ \| [\d.]+% ± [\d.]+% \| [+-][\d.]+ pts \|$"), out
        assert figures(out, r"^accuracy gap ours - trl: [+-][\d.]+ ± [\d.]+ points")
        assert figures(out, rf"^rounds' own ratios \(wall\):( \d+\.\d{{2}}){{{rounds}}}, median \d+\.\d{{3}}$"), out
        setup = r"^setup before the loop \(median s, not in the ratios below\): ours [\d.]+, trl [\d.]+; with it, "
        assert figures(out, setup + r"time_ratio_with_setup=\d+\.\d{3}$"), out
        assert figures(out, r"^cpu_time_ratio_ours_over_trl=\d+\.\d{3} ")
        assert figures(out, r"^time_ratio_ours_over_trl=\d+\.\d{3}$")
        record = json.loads((tmp_path / "vs_trl.json").read_text())
        assert [len(record["runs"][side]) for side in ("ours", "trl")] == [rounds, rounds]
        # each side's setup (model, prompts, trainer) timed apart from its loop
        assert all(run["setup_seconds"] > 0 and run["seconds"] > 0 for side in record["runs"].values() for run in side)


@pytest.mark.parametrize(
    ("script", "option", "required"),
    [
        ("vs_trl.py", "--iterations=-1", ()),
        ("vs_trl.py", "--rounds=0", ()),
        ("vs_trl.py", "--warmup=-1", ()),
        ("preference.py", "--seeds=0", ()),
        ("epoch_breakdown.py", "--epochs=-1", ()),
        ("packing.py", "--repeats=0", ()),
        ("compare_losses.py", "--epochs=-1", ()),
        ("random_model.py", "--layers=0", ("--out", "unused")),  # its one required option
        ("gpu_check.py", "--prompts=0", ()),
        ("lora_vs_full.py", "--steps=0", ()),
    ],
)
def test_a_benchmark_refuses_a_size_that_cannot_run(run_script, capsys, script, option, required):
    """-1 epochs reached Lightning as max_epochs=-1 (a run without end), 0 rounds or repeats a traceback after the
    work: argparse refuses them (``argtypes.at_least``) before any work, one line naming the option, exit 2."""
    with pytest.raises(SystemExit) as e:
        run_script(script, option, *required)
    assert e.value.code == 2
    assert f"argument {option.split('=')[0]}: " in capsys.readouterr().err


def test_epoch_breakdown_refuses_a_warmup_that_leaves_nothing(run_script, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_script("epoch_breakdown.py", "--epochs", "2", "--warmup", "2", "--out", str(tmp_path))
    assert e.value.code == 2
    assert "--warmup 2 leaves none of the 2 epochs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(HAS_TRL, reason="TRL is installed: test_vs_trl_prints_its_table_twice runs both halves")
def test_vs_trl_our_half_runs_without_trl(tmp_path, monkeypatch):
    """Without TRL, the half that is ours still runs exactly as the benchmark builds it."""
    monkeypatch.syspath_prepend(str(BENCH))
    from vs_trl import run_ours

    got = run_ours(1, seed=0, out=tmp_path, prompts=16)
    assert (got["completions"], got["steps"]) == (64, 1)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRL, reason=NO_TRL)
def test_preference_prints_its_table_twice(run_script, tmp_path):
    """Every method once, then one again into the same folder: the second table merges the first run's JSON (each
    method and seed counted once), as the README's split invocations rely on."""
    methods = ("sppo", "sppo_pair", "dpo", "ipo", "inpo", "dno", "trl_online_dpo", "trl_grpo")
    args = ("--iterations", "1", "--prompts", "16", "--val", "8", "--out", str(tmp_path), "--methods")
    out = run_script("preference.py", *args, *methods)
    for trl in ("trl_grpo", "trl_online_dpo"):
        assert figures(out, rf"^time_ratio_sppo_over_{trl}=\d+\.\d{{3}}$")
    again = run_script("preference.py", *args, "sppo")
    for printed in (out, again):
        for method in methods:
            pct = r"[\d.]+% ± [\d.]+%"  # win rate, LC win rate, (length), accuracy, then s / 1,000 completions
            row = rf"^\| `{method}` \| 1 \| {pct} \| {pct} \| [\d.]+ ± [\d.]+ \| {pct} \| [\d.]+ \|$"
            assert figures(printed, row), printed


@pytest.mark.slow
def test_preference_refuses_a_size_trl_cannot_step(run_script, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_script("preference.py", "--prompts", "10", "--out", str(tmp_path))
    assert e.value.code == 2


@pytest.mark.slow
def test_epoch_breakdown_prints_every_phase_twice(run_script, tmp_path):
    args = ("--epochs", "2", "--warmup", "1", "--out", str(tmp_path), "--", "--data.prompts_per_epoch=8")
    for _ in range(2):  # the second run meets the first one's config.yaml in the same folder
        out = run_script("epoch_breakdown.py", *args)
        for phase in ("time/rollout", "time/scoring", "time/ref_logprobs", "time/train", "time/validation"):
            assert figures(out, rf"^{phase} +[\d.]+ +\d+%"), out
        for raw in ("raw/generate", "raw/forward_backward"):
            assert figures(out, rf"^{raw} +[\d.]+ +\d+$")
        assert figures(out, r"^framework_overhead=\d+\.\d{3}$")
        assert json.loads((tmp_path / "epoch_breakdown.json").read_text())["train_tokens"] > 0


@pytest.mark.slow
def test_epoch_breakdown_refuses_what_train_py_refuses(run_script, tmp_path, capsys):
    """Built through train.py's CLI: a setting train.py rejects stops the benchmark the same way (one line, exit 2)."""
    with pytest.raises(SystemExit) as e:
        run_script("epoch_breakdown.py", "--epochs", "2", "--out", str(tmp_path), "--", "--data.eta=3")
    assert e.value.code == 2
    assert "data.eta" in capsys.readouterr().err


@pytest.mark.parametrize("workload", ["math", "demo"])
def test_packing_prints_every_setup_twice(run_script, tmp_path, workload):
    args = ("--workload", workload, "--rows", "4", "--hidden", "64", "--layers", "1", "--repeats", "1")
    args += ("--budget", "256", "--out", str(tmp_path / "packing.json"))
    for _ in range(2):
        out = run_script("packing.py", *args)
        assert figures(out, r"^setup +micro-batches +padding +pi_t s +train s +s / 1k resp tok +speed-up +wall s")
        setups = json.loads((tmp_path / "packing.json").read_text())["results"]
        assert len(setups) == 4
        columns = r" +\d+ +[\d.]+(%| t) +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+x +[\d.]+$"
        for name in setups:
            assert figures(out, rf"^{re.escape(name)}{columns}"), out


@pytest.mark.slow
def test_compare_losses_prints_a_row_per_loss_type_twice(tmp_path):
    """Its runs are train.py processes (the demo config, shortened); twice into the same folder, whose "before" must
    come from the new run, not the first run's logs."""
    cmd = [str(BENCH / "compare_losses.py"), "--epochs", "1", "--out", str(tmp_path), "--loss-types"]
    extra = ["--", "--data.prompts_per_epoch=8", "--data.val.init_args.num_prompts=16"]
    for losses in (["dpo"], ["dpo"]):
        done = forked.run(cmd + losses + extra, cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        for loss in losses:
            row = rf"^\| `{loss}` \| [\d.]+% -> [\d.]+% \| [+-][\d.]+ pts \| \d+ s \|$"
            assert figures(done.stdout, row), done.stdout
        results = json.loads((tmp_path / "results.json").read_text())
        assert [r["loss_type"] for r in results] == losses
    assert len(list((tmp_path / "dpo").glob("**/metrics.csv"))) == 2  # two runs, the table from the newer


def test_random_model_loads_as_a_qwen2(tmp_path, run_script):
    """As a user runs it (its own process), then again over the same folder: one ``from_pretrained`` loads, of the
    shape asked for."""
    from transformers import AutoConfig, AutoTokenizer

    args = ["--out", str(tmp_path), "--hidden", "32", "--layers", "1", "--heads", "2"]
    done = forked.run([str(BENCH / "random_model.py"), *args], cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for out in (done.stdout, run_script("random_model.py", *args)):
        assert re.search(rf"^\d+M parameters -> {re.escape(str(tmp_path))}$", out, flags=re.MULTILINE)
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen2", 32, 1)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id == config.pad_token_id
