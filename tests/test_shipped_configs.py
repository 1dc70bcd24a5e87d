"""Every config under ``configs/`` trains, on CPU, through the real CLI: ``python train.py fit --config FILE`` with
the file's own settings except the model (a tiny random model of the same family, ``tests/tiny_families.py``), the
data (the fixtures, in the same schema), the accelerator and devices (2 CPU processes over gloo where the config
shards; its strategy kept) and the sizes. The engine is the one the config names: SGLang through the stand-in
(``tests/rollout/fake_sglang``), PairRM through the tiny PairRM.

Each case's overrides are listed in ``CASES`` below, grouped as ``model``, ``data``, ``devices`` and ``sizes``, so a
reader sees that nothing else changed. Each run must do two iterations with at least two optimizer steps, finite
losses and a validation, read back from what the run's logger wrote (``metrics.csv``, or wandb's offline record
for the configs that log to wandb only).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.test_cli import REPO, read_metrics, run

CONFIGS = REPO / "configs"
FAKE_SGLANG = REPO / "tests" / "rollout" / "fake_sglang"
SHARDED = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy.init_args.data_parallel_size=2"]
DEMO_SIZES = ["--trainer.max_epochs=2", "--data.prompts_per_epoch=16", "--data.val.init_args.num_prompts=50",
              "--data.val_batch_size=50"]  # fmt: skip
# configs/fsdp1.yaml on 2 CPU processes: Lightning refuses FSDPStrategy on CPU, tests/cpu_fsdp1.py lifts that
FSDP1_CPU = "fsdp1_cpu.yaml"


@dataclass
class Case:
    """A shipped config (and the overlays it is layered on) and what the test swaps in, by kind."""

    configs: list[str]
    family: str | None = None  # tests/tiny_families.py; None = the config's own model (the shipped toy)
    data: str | None = None  # "math" | "ultrafeedback"; None = the config's own (the built-in addition task)
    devices: list[str] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)  # configs that validate outside training: turned on here
    sglang: bool = False  # the config's engine is SGLangEngine: run it through the stand-in
    wandb: bool = False  # the config logs to wandb (offline here): metrics read back from its record


SEVEN_B = ["qwen2.5-7b-math.yaml"]
# 4 prompts (2 per rank), 16-token responses, a 256-token budget (about one fixture row: each row its own
# micro-batch), 2 rows per optimizer step: 2 steps per iteration, as the recipe makes 4 of 256 rows
SEVEN_B_SIZES = ["--trainer.max_epochs=2", "--data.prompts_per_epoch=4", "--data.max_response_length=16",
                 "--data.max_tokens_per_micro_batch=256", "--data.rows_per_step=2",
                 "--data.val_batch_size=2"]  # fmt: skip
PAIRRM_SIZES = ["--trainer.max_epochs=2", "--data.prompts_per_epoch=2", "--data.max_response_length=16",
                "--data.micro_batch_size=2", "--data.rows_per_step=4"]  # fmt: skip


def pairrm_case(config: str, family: str) -> Case:
    """The authors' PairRM runs: UltraFeedback and the tiny PairRM, 2 processes, the stand-in; validation turned on."""
    validation = ["--trainer.limit_val_batches=1.0", "--data.val_batch_size=2"]
    return Case([config], family, "ultrafeedback", SHARDED, PAIRRM_SIZES, validation, sglang=True, wandb=True)


CASES = {
    "qwen2.5-7b-math.yaml": Case(SEVEN_B, "qwen2", "math", SHARDED, SEVEN_B_SIZES, sglang=True, wandb=True),
    "qwen2.5-7b-math-sppo.yaml": Case(
        SEVEN_B + ["qwen2.5-7b-math-sppo.yaml"],
        "qwen2",
        "math",
        SHARDED,
        [
            "--trainer.max_epochs=2",
            "--data.prompts_per_epoch=2",
            "--data.max_response_length=16",
            "--data.rows_per_step=10",
            "--data.val_batch_size=2",
        ],
        sglang=True,
        wandb=True,
    ),  # fmt: skip
    "qwen2.5-7b-math-our-scorer.yaml": Case(
        SEVEN_B + ["qwen2.5-7b-math-our-scorer.yaml"], "qwen2", "math", SHARDED, SEVEN_B_SIZES, sglang=True, wandb=True
    ),
    "mistral-7b-sppo-pairrm.yaml": pairrm_case("mistral-7b-sppo-pairrm.yaml", "mistral"),
    "llama-3-8b-sppo-pairrm.yaml": pairrm_case("llama-3-8b-sppo-pairrm.yaml", "llama"),
    "qwen2.5-7b-math-lora.yaml": Case(
        ["qwen2.5-7b-math-lora.yaml"],
        "qwen2",
        "math",
        ["--trainer.accelerator=cpu"],
        SEVEN_B_SIZES,
        sglang=True,
        wandb=True,
    ),
    "demo.yaml": Case(["demo.yaml"], sizes=DEMO_SIZES),
    "fsdp_cpu.yaml": Case(["demo.yaml", "fsdp_cpu.yaml"], sizes=DEMO_SIZES),
    "wandb.yaml": Case(["demo.yaml", "wandb.yaml"], sizes=DEMO_SIZES, wandb=True),
    "fsdp1.yaml": Case(["demo.yaml", "fsdp1.yaml", FSDP1_CPU], sizes=DEMO_SIZES),
}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Built on first use, once per session: ``family -> folder``."""
    from tests.tiny_families import build_family

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """The fixtures written by the project's own prepare scripts, once per session: ``name -> folder``."""
    from sppo_lightning.data.prepare_math import prepare as prepare_math
    from sppo_lightning.data.prepare_ultrafeedback import prepare as prepare_ultrafeedback

    out = tmp_path_factory.mktemp("prepared")
    prepare_math(str(REPO / "tests" / "fixtures" / "math"), out / "math")
    prepare_ultrafeedback(str(REPO / "tests" / "fixtures" / "ultrafeedback"), out / "ultrafeedback")
    return {"math": out / "math", "ultrafeedback": out / "ultrafeedback"}


# --------------------------------------------------------------------------------------------- the overrides
def model_overrides(case: Case, family_dirs, tiny_pairrm_dir) -> list[str]:
    if case.family is None:
        return []
    args = [f"--model.model_name_or_path={family_dirs(case.family)}"]
    if case.data == "ultrafeedback":  # the judge the config names, at toy size
        args.append(f"--data.oracle.init_args.model_name_or_path={tiny_pairrm_dir}")
    return args


def data_overrides(case: Case, prepared_data) -> list[str]:
    if case.data is None:
        return []
    folder = prepared_data[case.data]
    args = [f"--data.train.init_args.paths={folder / 'train.parquet'}"]
    if case.data == "math":
        return args + [f"--data.val.init_args.paths={folder / 'test.parquet'}"]
    # the paper's configs have no validation set (AlpacaEval runs outside): UltraFeedback's test prompts here
    return args + ["--data.val=sppo_lightning.data.PromptFiles", f"--data.val.init_args.paths={folder}/test.parquet"]


def fit(case: Case, root: Path, *overrides: str):
    configs = []
    for name in case.configs:
        path = CONFIGS / name
        if name == FSDP1_CPU:
            from tests.test_fsdp import FSDP1_ON_CPU

            path = root.parent / FSDP1_CPU
            path.write_text(FSDP1_ON_CPU)
        configs += ["--config", str(path)]
    env = dict(os.environ)
    if case.sglang:  # `import sglang` in every rank process gives the stand-in; each engine leaves a record
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(FAKE_SGLANG), str(REPO), env.get("PYTHONPATH", "")] if p)
        env["SGLANG_STANDIN_DUMP"] = str(root.parent / "engines")
        (root.parent / "engines").mkdir()
    if case.wandb:  # no credentials: the config's WandbLogger records offline under the run folder
        env = {k: v for k, v in env.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    start = time.monotonic()
    proc = run("fit", *configs, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
               *overrides, env=env, ranks=2 if case.devices == SHARDED else 1)  # fmt: skip
    return proc, time.monotonic() - start


# --------------------------------------------------------------------------------------------- what a run left
def logged_rows(root: Path, wandb: bool) -> list[dict]:
    """The rows the run's logger wrote: metrics.csv, or (a wandb-only config) the history of wandb's offline record."""
    rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in read_metrics(root)]
    if rows or not wandb:
        return rows
    from tests.wandb_record import history, records

    [record] = root.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60  # wandb's service may still be writing when fit returns
    while not any(r.WhichOneof("record_type") == "exit" for r in records(record)) and time.monotonic() < deadline:
        time.sleep(1)
    return [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in history(record)]


def values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if key in r]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES), ids=[n.removesuffix(".yaml") for n in CASES])
def test_shipped_config_trains_on_cpu(name, tmp_path, family_dirs, prepared_data, tiny_pairrm_dir):
    case = CASES[name]
    model = model_overrides(case, family_dirs, tiny_pairrm_dir)
    data = data_overrides(case, prepared_data)
    root = tmp_path / "run"
    proc, seconds = fit(case, root, *model, *data, *case.devices, *case.sizes, *case.validation)
    print(f"{name}: fit in {seconds:.1f} s")

    rows = logged_rows(root, case.wandb)
    losses = values(rows, "train/loss")
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses), losses
    assert len(values(rows, "train/grad_norm")) >= 2  # logged once per optimizer step, whatever the accumulation
    assert len(values(rows, "time/train")) == 2  # two iterations
    validation = values(rows, "val/accuracy") or values(rows, "val/win_rate")
    assert len(validation) >= 2 and all(math.isfinite(v) for v in validation)

    [config] = root.glob("**/config.yaml")  # the run's resolved settings, as recorded (beside the CSV logs)
    saved = yaml.safe_load(config.read_text())
    if case.devices == SHARDED:  # sharded as the config says: FSDP2 over 2 gloo processes
        assert saved["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")
        assert "sharded over data_parallel=2" in proc.stdout + proc.stderr
    if case.sglang:  # both ranks' engines were the SGLang stand-in, and each generated
        import torch

        engines = [torch.load(p, weights_only=False) for p in (tmp_path / "engines").glob("*.pt")]
        processes = 2 if case.devices == SHARDED else 1
        assert len(engines) == processes and all("generate" in e["calls"] for e in engines)
    if case.data == "ultrafeedback":  # the authors' win-rates from PairRM's scores: mean_j σ(s_i − s_j), K/2 a group
        samples = [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()]
        win_rates = [[r["win_rate"] for r in s["responses"]] for s in samples]
        assert {len(w) for w in win_rates} == {5} and all(sum(w) == pytest.approx(2.5, abs=1e-4) for w in win_rates)
        assert max(max(w) - min(w) for w in win_rates) > 0.01  # the judge tells the responses apart
    if "lora" in name:  # the 1-GPU recipe: adapters on a bf16 base, both exports written
        assert saved["model"]["lora"]["r"] == 32 and saved["model"]["base_dtype"] == "bfloat16"
        assert (root / "hf_model" / "model.safetensors").is_file()
        assert (root / "hf_adapter" / "adapter_config.json").is_file()
    if SEVEN_B[0] in case.configs or "lora" in name:  # attn_implementation auto, resolved for packed rows on CPU
        assert "attention: sdpa (packed rows" in proc.stdout + proc.stderr
    if SEVEN_B[0] in case.configs and name != "qwen2.5-7b-math-sppo.yaml":
        # the GPU recipe's training path: packed rows, gradient checkpointing, token-budget micro-batches
        m, d = saved["model"], saved["data"]
        assert m["packed"] and m["gradient_checkpointing"] and d["max_tokens_per_micro_batch"] == 256
        assert m["fsdp_param_dtype"] == "bfloat16" and m["dtype"] == "float32"


# ---------------------------------------------------------------------------------------------- coverage
def test_every_shipped_config_has_a_training_case():
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    assert shipped == set(CASES), f"configs without a training case: {sorted(shipped - set(CASES))}"
    for case in CASES.values():
        assert all((CONFIGS / c).is_file() for c in case.configs if c != FSDP1_CPU)


@pytest.mark.parametrize("sweep", sorted(p.name for p in (CONFIGS / "sweeps").glob("*.yaml")))
def test_each_sweep_runs_a_trained_config(sweep):
    """A wandb sweep's agent runs ``command`` with the sampled values appended: its ``--config`` files are one of
    the cases above, and the parameters it samples are keys the CLI takes."""
    import inspect

    from lightning.pytorch import Trainer

    from sppo_lightning.data.datamodule import RolloutDataModule
    from sppo_lightning.module import SPPOModule

    spec = yaml.safe_load((CONFIGS / "sweeps" / sweep).read_text())
    command = spec["command"]
    configs = [Path(command[i + 1]).name for i, a in enumerate(command) if a == "--config"]
    assert spec["program"] == "train.py" and "fit" in command
    assert any(case.configs == configs for case in CASES.values()), configs
    takes = {"model": SPPOModule, "data": RolloutDataModule, "trainer": Trainer}
    for key in spec["parameters"]:
        group, _, name = key.partition(".")
        assert name in inspect.signature(takes[group]).parameters, key
