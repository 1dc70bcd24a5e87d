"""The 7B MATH configs: every value of the reference run, and they build the real modules once the model and the
data are swapped for tiny local ones (nothing is downloaded; the GPU strategy is kept, only the accelerator moves
to CPU so the Trainer can be constructed here)."""

import sys
from pathlib import Path

import pytest
from lightning.pytorch.strategies import ModelParallelStrategy

from sppo_lightning.cli import make_cli
from sppo_lightning.data.prepare_math import prepare
from sppo_lightning.rollout.sglang import SGLangEngine

REPO = Path(__file__).resolve().parents[1]
SEED_RECIPE = str(REPO / "configs" / "qwen2.5-7b-math.yaml")
PAPER = str(REPO / "configs" / "qwen2.5-7b-math-sppo.yaml")
OUR_SCORER = str(REPO / "configs" / "qwen2.5-7b-math-our-scorer.yaml")


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
    return make_cli(args, run=False)  # as train.py builds it: outputs under default_root_dir


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
    # 4 optimizer steps per rollout: 1,024 rows / 256 rows a step (actor.ppo_mini_batch_size), any GPUs and lengths
    assert t.accumulate_grad_batches == 1 and d.prompts_per_epoch * d.samples_per_prompt // d.rows_per_step == 4
    # "20 epochs" of 1,024-prompt batches over 7,500 problems, verl's drop_last: 7 rollouts a pass, 140 in all
    assert t.max_epochs == 20 * (7500 // d.prompts_per_epoch) == 140
    assert isinstance(t.strategy, ModelParallelStrategy) and t.gradient_clip_val == 1.0
    assert isinstance(cli.datamodule.engine, SGLangEngine) and cli.datamodule.engine.mem_fraction_static == 0.3
    assert type(t.logger).__name__ == "WandbLogger"
    # the data really loads: the fixtures' problems (one has no boxed answer and was skipped by prepare_math)
    assert len(cli.datamodule.train_source.load()) == 3 and len(cli.datamodule.val_source.load()) == 2


def test_seed_recipe_scores_trains_and_schedules_as_verl(tmp_path, tiny_model_dir):
    """verl's scorer for the reward and the validation, its warm-up per rollout, its decay of every parameter."""
    from sppo_lightning.rewards import RuleOracle
    from sppo_lightning.rewards.math import compute_score_verl

    cli = build(tmp_path, tiny_model_dir, SEED_RECIPE)
    module, oracle = cli.model, cli.datamodule.oracle
    assert module.accuracy_fn is compute_score_verl
    assert isinstance(oracle, RuleOracle) and oracle.score_fn is compute_score_verl
    assert compute_score_verl("\\fbox{4}", "4") == 0.0  # verl's verdict, not our checker's

    module.configure_model()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]
    decayed, spared = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and not spared["params"]  # biases and norms decay too
    assert len(decayed["params"]) == len(list(module.parameters()))
    assert config["lr_scheduler"]["interval"] == "epoch"  # Lightning steps it once per iteration = rollout
    lrs = []
    for _ in range(17):  # what each rollout trains at
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler["scheduler"].step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-6 / 15) and lrs[14] == pytest.approx(14e-6 / 15)
    assert lrs[15] == lrs[16] == 1e-6


def test_our_scorer_overlay_swaps_reward_and_validation_only(tmp_path, tiny_model_dir):
    from sppo_lightning.rewards.math import compute_score

    seed, ours = build(tmp_path, tiny_model_dir, SEED_RECIPE), build(tmp_path, tiny_model_dir, SEED_RECIPE, OUR_SCORER)
    assert ours.model.accuracy_fn is compute_score and ours.datamodule.oracle.score_fn is compute_score
    assert ours.model.hparams == seed.model.hparams and ours.datamodule.hparams == seed.datamodule.hparams


def test_paper_estimator_config_layers_on_the_seed_recipe(tmp_path, tiny_model_dir):
    cli = build(tmp_path, tiny_model_dir, SEED_RECIPE, PAPER)
    m, d = cli.model.hparams, cli.datamodule.hparams
    assert (m.loss_type, d.samples_per_prompt, d.prompts_per_epoch % 4) == ("sppo", 5, 0)
    assert m.learning_rate == 1e-6 and isinstance(cli.datamodule.engine, SGLangEngine)  # the rest is inherited
    assert cli.datamodule.loss_type == m.loss_type  # linked from model.loss_type
    cli.datamodule._check_settings()  # a possible combination
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


# ------------------------------------------------------------------ the paper's pipeline: PairRM on UltraFeedback
MISTRAL = str(REPO / "configs" / "mistral-7b-sppo-pairrm.yaml")
LLAMA = str(REPO / "configs" / "llama-3-8b-sppo-pairrm.yaml")


def build_pairrm(tmp_path, tiny_model_dir, tiny_pairrm_dir, config, *extra):
    """A paper config with the tiny policy, the tiny PairRM and UltraFeedback's fixture prompts swapped in."""
    from sppo_lightning.data.prepare_ultrafeedback import prepare as prepare_ultrafeedback

    data = tmp_path / "ultrafeedback"
    prepare_ultrafeedback(str(REPO / "tests" / "fixtures" / "ultrafeedback"), data)
    args = [
        "--config", config,
        f"--model.model_name_or_path={tiny_model_dir}",
        f"--data.train.init_args.paths={data / 'train.parquet'}",
        f"--data.oracle.init_args.model_name_or_path={tiny_pairrm_dir}",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        *extra,
    ]  # fmt: skip
    return make_cli(args, run=False)  # as train.py builds it: outputs under default_root_dir


@pytest.mark.parametrize(
    ("config", "model"),
    [(MISTRAL, "mistralai/Mistral-7B-Instruct-v0.2"), (LLAMA, "meta-llama/Meta-Llama-3-8B-Instruct")],
    ids=["mistral", "llama"],
)
def test_pairrm_configs_are_the_authors_run(tmp_path, tiny_model_dir, tiny_pairrm_dir, config, model):
    from sppo_lightning.rewards.pairrm import PairRMOracle

    assert f"model_name_or_path: {model}" in Path(config).read_text()
    cli = build_pairrm(tmp_path, tiny_model_dir, tiny_pairrm_dir, config)
    m, d, t = cli.model.hparams, cli.datamodule.hparams, cli.trainer
    # uclaml/SPPO pipeline.sh: loss "sppo" (winner/loser), beta 1e-3 = 1/eta, lr 5e-7; config_full.yaml: bf16, ckpt
    assert (m.loss_type, m.eta, m.learning_rate, m.weight_decay) == ("sppo_pair", 1000.0, 5e-7, 0.0)
    assert (m.fsdp_param_dtype, m.gradient_checkpointing) == ("bfloat16", True)
    # generate.sh / generate.py: K = 5 at temperature 0.7, top-p 0.9; config_full.yaml: 512 prompt + 512 response
    assert (d.samples_per_prompt, d.temperature, d.top_p) == (5, 0.7, 0.9)
    assert (d.max_prompt_length, d.max_response_length, d.passes_per_rollout) == (512, 512, 1)
    # 3 iterations, each a disjoint third of the prompts; 8 GPUs x 8 pairs = 64 pairs per optimizer step
    assert t.max_epochs == 3 and 3 * d.prompts_per_epoch <= 61135 and t.limit_val_batches == 0
    assert t.num_devices == 8 and d.micro_batch_size // 2 * t.num_devices == d.rows_per_step // 2 == 64
    assert isinstance(t.strategy, ModelParallelStrategy) and isinstance(cli.datamodule.engine, SGLangEngine)
    oracle = cli.datamodule.oracle
    assert isinstance(oracle, PairRMOracle) and oracle.from_scores and oracle.include_self
    assert cli.datamodule.loss_type == m.loss_type  # linked from model.loss_type
    cli.datamodule._check_settings()  # a possible combination
    assert [r.messages[0]["content"] for r in cli.datamodule.train_source.load()][:1] == [
        "Write a haiku about autumn leaves."
    ]


# Training end to end, every config under configs/: tests/test_shipped_configs.py
