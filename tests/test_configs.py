"""The 7B MATH configs: every value of the reference run, and they build the real modules once the model and the
data are swapped for tiny local ones (nothing is downloaded; the GPU strategy is kept, only the accelerator moves
to CPU so the Trainer can be constructed here)."""

import sys
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy

from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.data.prepare_math import prepare
from sppo_lightning.module import SPPOModule
from sppo_lightning.rollout.sglang import SGLangEngine

REPO = Path(__file__).resolve().parents[1]
SEED_RECIPE = str(REPO / "configs" / "qwen2.5-7b-math.yaml")
PAPER = str(REPO / "configs" / "qwen2.5-7b-math-sppo.yaml")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI(args=...) warns about pytest's own arguments


def build(tmp_path, tiny_model_dir, *configs):
    data = tmp_path / "math"
    prepare(str(REPO / "tests" / "fixtures" / "math"), data)
    args = [a for c in configs for a in ("--config", c)] + [
        f"--model.model_name_or_path={tiny_model_dir}",
        f"--data.train.init_args.paths={data / 'train.parquet'}",
        f"--data.val.init_args.paths={data / 'test.parquet'}",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    return LightningCLI(
        SPPOModule, RolloutDataModule, run=False, args=args, parser_kwargs={"parser_mode": "omegaconf+"}
    )


def test_seed_recipe_config_is_the_reference_run(tmp_path, tiny_model_dir):
    cli = build(tmp_path, tiny_model_dir, SEED_RECIPE)
    m, d, t = cli.model.hparams, cli.datamodule.hparams, cli.trainer
    assert (m.loss_type, m.eta, m.learning_rate, m.weight_decay, m.warmup_steps) == (
        "sppo_softmean",
        1.0,
        1e-6,
        0.01,
        15,
    )
    assert (m.dtype, m.fsdp_param_dtype, m.gradient_checkpointing) == ("float32", "bfloat16", True)
    assert (d.prompts_per_epoch, d.samples_per_prompt, d.temperature) == (1024, 1, 1.0)
    assert (d.max_prompt_length, d.max_response_length, d.overlong_prompts) == (1024, 512, "filter")
    assert (d.micro_batch_size, d.val_temperature) == (4, 0.0)
    assert m.packed and d.max_tokens_per_micro_batch == 1792  # use_remove_padding, token-budget micro-batches
    # 4 optimizer steps per rollout: 1,024 rows / (4 GPUs x micro-batch 4 x 16 accumulated) = 4
    assert d.prompts_per_epoch * d.samples_per_prompt // (4 * d.micro_batch_size * t.accumulate_grad_batches) == 4
    assert t.max_epochs * d.prompts_per_epoch >= 20 * 7500 > (t.max_epochs - 1) * d.prompts_per_epoch
    assert isinstance(t.strategy, ModelParallelStrategy) and t.gradient_clip_val == 1.0
    assert isinstance(cli.datamodule.engine, SGLangEngine) and cli.datamodule.engine.mem_fraction_static == 0.5
    assert type(t.logger).__name__ == "WandbLogger"
    # the data really loads: the fixtures' problems (one has no boxed answer and was skipped by prepare_math)
    assert len(cli.datamodule.train_source.load()) == 3 and len(cli.datamodule.val_source.load()) == 2


def test_paper_estimator_config_layers_on_the_seed_recipe(tmp_path, tiny_model_dir):
    cli = build(tmp_path, tiny_model_dir, SEED_RECIPE, PAPER)
    m, d = cli.model.hparams, cli.datamodule.hparams
    assert (m.loss_type, d.samples_per_prompt, d.prompts_per_epoch % 4) == ("sppo", 5, 0)
    assert m.learning_rate == 1e-6 and isinstance(cli.datamodule.engine, SGLangEngine)  # the rest is inherited
    cli.datamodule._check_settings(m.loss_type)  # a possible combination
    assert d.micro_batch_size % d.samples_per_prompt == 0


@pytest.mark.parametrize("config", [SEED_RECIPE, PAPER])
def test_print_config_passes(config, tmp_path):
    from tests.test_cli import run

    configs = ["--config", SEED_RECIPE] + (["--config", PAPER] if config == PAPER else [])
    out = run("fit", *configs, "--print_config").stdout
    assert "model_name_or_path: Qwen/Qwen2.5-7B-Instruct" in out


def test_fsdp1_overlay_replaces_the_strategy():
    from tests.test_cli import run

    out = run("fit", "--config", SEED_RECIPE, "--config", str(REPO / "configs" / "fsdp1.yaml"), "--print_config").stdout
    assert "class_path: lightning.pytorch.strategies.FSDPStrategy" in out
    assert "state_dict_type: sharded" in out and "data_parallel_size" not in out  # FSDP2's arguments are gone
    assert "precision: bf16-mixed" in out and "devices: 4" in out  # the recipe's GPU count stays
