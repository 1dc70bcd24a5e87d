"""``python -m sppo_lightning.plan``: the table for the 7B recipe and the demo, the arithmetic by hand, and the
estimate against the peak memory measured on CPU (tests/plan_peak.py, in a subprocess)."""

import json
import subprocess
import sys

import pytest

from sppo_lightning.plan import GIB, RunShape, main, model_config, model_shape, training_memory
from tests.test_cli import DEMO, REPO

SEED_RECIPE = str(REPO / "configs" / "qwen2.5-7b-math.yaml")
QWEN_7B_PARAMS = 7_615_616_512  # Qwen2.5-7B-Instruct's published parameter count


def plan(capsys, *args) -> str:
    main(list(args))
    return capsys.readouterr().out


def test_7b_recipe_table_fits_on_80_gib_and_not_on_40(capsys):
    out = plan(capsys, "--config", SEED_RECIPE)
    assert "7.616 B parameters" in out and "fsdp2 over 4 GPU(s) (4 shard(s))" in out
    # the recipe's token budget bounds a micro-batch (verl's use_dynamic_bsz), not its 4-row count
    assert "micro-batch of up to 1,792 tokens (rows of 1024 + 512 tokens), accumulate 16" in out
    assert "gradient checkpointing on" in out
    parts = ["parameters", "gradients", "optimizer", "activations, checkpointing", "activations, none"]
    parts += ["SGLang weights", "SGLang KV cache", "tokens per iteration: 1,572,864", "time per iteration"]
    for part in parts:
        assert part in out, part
    assert "fits on a 80 GiB GPU" in out
    assert "does NOT fit on a 40 GiB GPU" in plan(capsys, "--config", SEED_RECIPE, "--gpu-memory-gib", "40")


def test_overlays_and_dotted_overrides_reach_the_plan(capsys):
    fsdp1 = str(REPO / "configs" / "fsdp1.yaml")
    args = ["--config", SEED_RECIPE, "--config", fsdp1, "--model.gradient_checkpointing=false", "--json"]
    out = json.loads(plan(capsys, *args))
    assert out["run"]["strategy"] == "fsdp1" and not out["run"]["checkpointing"]
    assert out["training"]["activations"] == out["training"]["activations_no_checkpointing"]


def test_7b_memory_by_hand(capsys):
    out = json.loads(plan(capsys, "--config", SEED_RECIPE, "--json"))
    train, roll = out["training"], out["rollout"]
    assert out["model"]["params"] == QWEN_7B_PARAMS
    # FSDP2 over 4 GPUs, float32 master weights: parameters, gradients, 2 AdamW moments, each a quarter per GPU
    assert train["parameters"] == train["gradients"] == QWEN_7B_PARAMS * 4 / 4
    assert train["optimizer"] == 2 * QWEN_7B_PARAMS * 4 / 4
    # SGLang: 0.3 of 80 GiB, of which the bf16 weights, the rest KV cache (2 x 28 layers x 512 wide x 2 bytes a token)
    assert roll["sglang_weights"] == QWEN_7B_PARAMS * 2
    assert roll["sglang_kv_cache"] == pytest.approx(0.3 * 80 * GIB - QWEN_7B_PARAMS * 2)
    assert roll["kv_tokens"] == pytest.approx(roll["sglang_kv_cache"] / (2 * 28 * 512 * 2))
    assert out["time"]["tokens"] == 1024 * (1024 + 512)


def test_demo_table(capsys):
    out = plan(capsys, "--config", DEMO)
    assert "single over 1 CPU(s)" in out and "micro-batch 64 rows of 64 + 16 tokens" in out
    assert "of process memory" in out and "tokens per iteration: 20,480" in out


def test_unknown_hub_model_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", DEMO, "--model.model_name_or_path=nobody/no-such-model"])
    assert e.value.code == 2 and "nobody/no-such-model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A 5M-parameter Qwen2 shape: config.json only (the plan reads no weights; the measurement makes its own)."""
    from transformers import Qwen2Config

    out = tmp_path_factory.mktemp("plan_model")
    Qwen2Config(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    ).save_pretrained(out)  # fmt: skip
    return out


@pytest.mark.parametrize(
    "dtype, checkpointing",
    [("float32", False), ("float32", True), ("bfloat16", False)],
    ids=["fp32", "fp32+checkpointing", "bf16"],
)
def test_estimate_within_25_percent_of_measured_peak_on_cpu(capsys, small_model_dir, dtype, checkpointing):
    """Peak resident memory of two optimizer steps (8 rows of 96 + 160 tokens), measured over the process's memory
    before the model existed, against the plan of the demo config with this model and these lengths."""
    lengths = ["--data.micro_batch_size=8", "--data.max_prompt_length=96", "--data.max_response_length=160"]
    args = ["--config", DEMO, f"--model.model_name_or_path={small_model_dir}", *lengths, f"--model.dtype={dtype}"]
    estimate = json.loads(plan(capsys, *args, f"--model.gradient_checkpointing={str(checkpointing).lower()}", "--json"))
    cmd = [sys.executable, str(REPO / "tests" / "plan_peak.py"), str(small_model_dir), "--rows=8", "--prompt=96"]
    cmd += ["--response=160", f"--dtype={dtype}"] + (["--checkpointing"] if checkpointing else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured["params"] == estimate["model"]["params"]
    ratio = estimate["training"]["peak"] / measured["peak_bytes"]
    assert 0.75 <= ratio <= 1.25, f"estimate {estimate['training']['peak']:,.0f} B, measured {measured['peak_bytes']:,}"


def test_model_shape_of_a_local_folder_counts_tied_weights_once(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    shape = model_shape(*model_config(str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    run = RunShape(accelerator="cpu", micro_batch=1, prompt_len=1, response_len=1)
    assert training_memory(shape, run)["parameters"] == shape.params * 4


def test_host_memory_per_rank_and_node(capsys):
    """Issue #28: under FSDP2 rank 0 alone holds the whole float32 model in host memory while it loads (the other
    ranks receive their shards on their GPUs); FSDP1 loads it whole in each of the node's 4 ranks."""
    fsdp2 = json.loads(plan(capsys, "--config", SEED_RECIPE, "--json"))["host"]
    whole = QWEN_7B_PARAMS * 4
    assert fsdp2 == {"load_rank0": whole, "load_other_rank": 0.0, "training_per_rank": 0.0, "load_node0": whole}
    fsdp1 = json.loads(
        plan(capsys, "--config", SEED_RECIPE, "--config", str(REPO / "configs" / "fsdp1.yaml"), "--json")
    )
    assert fsdp1["host"]["load_other_rank"] == whole and fsdp1["host"]["load_node0"] == 4 * whole
    table = plan(capsys, "--config", SEED_RECIPE)
    assert "rank 0                        28.37 GiB" in table and "node 0 (4 rank(s))            28.37 GiB" in table
    offload = json.loads(plan(capsys, "--config", SEED_RECIPE, "--model.fsdp_cpu_offload=true", "--json"))["host"]
    assert offload["training_per_rank"] == 4 * QWEN_7B_PARAMS * 4 / 4  # its shards, gradients and 2 AdamW moments
