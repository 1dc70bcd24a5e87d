"""The colocated SGLang engine under FSDP2 on 2 CPU processes (gloo), through the real CLI, and its refusal of
FSDP1.

Each rank starts its own engine (the stand-in, importable in the rank processes from ``fake_sglang``); after the
fit, each engine must hold the whole trained weights, gathered from the shards, under the Hugging Face names
SGLang's loader knows. Not exercised: NCCL, CPU-offloaded shards moved to a GPU before the gather.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from sppo_lightning.export import export_checkpoint
from tests.test_cli import DEMO, REPO, run
from tests.test_fsdp import FSDP, FSDP1_ON_CPU

FAKE = REPO / "tests" / "rollout" / "fake_sglang"
SMALL = ["--trainer.max_epochs=1", "--data.prompts_per_epoch=16", "--data.val.init_args.num_prompts=50",
         "--data.val_batch_size=50", "--trainer.enable_progress_bar=false"]  # fmt: skip


def fit_with_standin(tmp_path, *configs, check=True, ranks=1):
    dump = tmp_path / "engines"
    dump.mkdir()
    path = os.pathsep.join(p for p in [str(FAKE), str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    env = {**os.environ, "PYTHONPATH": path, "SGLANG_STANDIN_DUMP": str(dump)}
    proc = run(
        "fit", *configs, *SMALL, f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--data.engine=sppo_lightning.rollout.sglang.SGLangEngine", "--data.engine.init_args.dtype=float32",
        env=env, check=check, ranks=ranks,
    )  # fmt: skip
    return proc, [torch.load(p, weights_only=False) for p in sorted(dump.glob("*.pt"))]


@pytest.mark.slow
def test_each_fsdp2_rank_engine_holds_the_trained_weights(tmp_path):
    _, engines = fit_with_standin(tmp_path, "--config", DEMO, "--config", FSDP, ranks=2)
    root = tmp_path / "run"
    export_checkpoint(root / "checkpoints" / "last.ckpt", tmp_path / "hf")
    final = load_file(tmp_path / "hf" / "model.safetensors")

    assert sorted(e["init"]["random_seed"] for e in engines) == [0, 1]  # seed_everything 0 + rank
    for engine in engines:
        assert engine["calls"].count("end_weight_update") == 3  # validation, rollout, validation
        assert engine["loaded"].keys() == final.keys()  # Hugging Face names, no FSDP wrapper in them
        for name, tensor in engine["loaded"].items():
            torch.testing.assert_close(tensor, final[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_fsdp1_is_refused_naming_the_strategy(tmp_path):
    """Validation generates inside FSDP1's forward, where summon_full_params is refused: found by running it."""
    overlay = tmp_path / "fsdp1_cpu.yaml"
    overlay.write_text(FSDP1_ON_CPU)
    configs = ["--config", DEMO, "--config", str(REPO / "configs" / "fsdp1.yaml"), "--config", str(overlay)]
    proc, engines = fit_with_standin(tmp_path, *configs, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.strategy=FSDPStrategy (FSDP1) with data.engine=SGLangEngine is not supported" in proc.stderr
    assert engines == []  # refused before any engine started
