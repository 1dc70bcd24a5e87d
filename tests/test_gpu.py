"""GPU runs of the real CLI, skipped without CUDA (CI has none; run them wherever a GPU is at hand: ``pytest -m gpu``).

- the demo on one GPU (HF engine, fp32), as a newcomer with a GPU would run it;
- FSDP2 (ModelParallelStrategy) on one GPU: NCCL, bf16 compute with fp32 gradient reduction, then the HF export,
  with each attention backend ``sppo_lightning.attention`` finds usable here (flash-attn 2 only where transformers
  says it is usable: sglang's ``flash-attn-4`` makes ``find_spec("flash_attn")`` true without it), padded and
  packed rows, the packed ones under gradient checkpointing;
- FSDP1 (FSDPStrategy) on one GPU: training, sharded checkpoint, export;
- the demo with SGLang generating the rollouts (colocated engine), skipped unless ``sglang`` is installed.
"""

import importlib.util

import pytest
import torch

from sppo_lightning import attention
from tests.test_cli import DEMO, REPO, run, val_accuracies

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.max_epochs=3"]


def test_demo_on_one_gpu(tmp_path):
    run("fit", "--config", DEMO, *GPU, f"--trainer.default_root_dir={tmp_path}")
    acc = val_accuracies(tmp_path)
    assert len(acc) == 4 and acc[-1] > acc[0]


def usable_backends() -> list[str]:
    """The attention backends that can run on this GPU, by the detection ``model.attn_implementation`` uses."""
    checks = {
        "flash_attention_2": attention.flash_attn_2_usable,
        "varlen_attn": lambda: attention.varlen_attn_usable("cuda"),
    }
    return ["sdpa", *(name for name, usable in checks.items() if usable()[0])]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed+checkpointing"])
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2", "varlen_attn"])
def test_fsdp2_bf16_on_one_gpu_with_each_usable_attention(tmp_path, attn, packed):
    if attn not in usable_backends():
        pytest.skip(f"{attn} is not usable here: model.attn_implementation={attn} would be refused")
    rows = ["--model.packed=true", "--model.gradient_checkpointing=true"] if packed else ["--model.packed=false"]
    proc = run(
        "fit",
        "--config",
        DEMO,
        "--config",
        str(REPO / "configs" / "fsdp_cpu.yaml"),
        *GPU,
        "--trainer.strategy.init_args.data_parallel_size=1",
        "--data.micro_batch_size=64",
        f"--model.attn_implementation={attn}",
        *rows,
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert "compute dtype bfloat16" in proc.stdout + proc.stderr
    assert f"attention: {attn} (" in proc.stdout + proc.stderr
    acc = val_accuracies(tmp_path)
    assert len(acc) == 4 and all(0.0 <= a <= 1.0 for a in acc)
    assert (tmp_path / "hf_model" / "model.safetensors").is_file()


def test_fsdp1_on_one_gpu_learns_and_its_shards_export_like_the_run(tmp_path):
    """Lightning's FSDPStrategy: the rollout and the π_t pass run through the FSDP1 root's forward; the sharded
    last.ckpt exports to the same weights the run exported at its end."""
    from safetensors.torch import load_file

    from sppo_lightning.export import export_checkpoint

    fsdp1 = str(REPO / "configs" / "fsdp1.yaml")
    proc = run("fit", "--config", DEMO, "--config", fsdp1, *GPU, f"--trainer.default_root_dir={tmp_path}")
    assert "FSDP1: one unit per Qwen2DecoderLayer" in proc.stdout + proc.stderr
    acc = val_accuracies(tmp_path)
    assert len(acc) == 4 and acc[-1] > acc[0]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_dir()  # shards
    export_checkpoint(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "again")
    at_end, again = (
        load_file(tmp_path / "hf_model" / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert at_end.keys() == again.keys()
    for name, tensor in at_end.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs the sglang extra")
def test_demo_with_sglang_rollouts(tmp_path):
    run(
        "fit",
        "--config",
        DEMO,
        *GPU,
        "--data.engine=sppo_lightning.rollout.sglang.SGLangEngine",
        "--data.engine.init_args.mem_fraction_static=0.3",
        f"--trainer.default_root_dir={tmp_path}",
    )
    acc = val_accuracies(tmp_path)
    assert len(acc) == 4 and acc[-1] > acc[0]


def test_reward_model_oracle_visits_the_gpu_only_while_scoring(tiny_classifier_dir):
    """The reward model scores on the policy's GPU and goes back to CPU memory afterwards (offload)."""
    from sppo_lightning.data.prompts import PromptRecord
    from sppo_lightning.rewards.reward_model import RewardModelOracle
    from sppo_lightning.rollout.base import Rollout

    rollout = Rollout(
        prompts=[PromptRecord([{"role": "user", "content": "What is 1+1?"}], "2")],
        prompt_ids=[[1]],
        response_ids=[[[5], [6]]],
        response_text=[["\\boxed{2}", "\\boxed{3}"]],
    )
    oracle = RewardModelOracle(str(tiny_classifier_dir), dtype="float32")
    gpu_scores = oracle.score(rollout, device=torch.device("cuda")).rewards
    assert next(oracle.classifier.model.parameters()).device.type == "cpu"
    cpu_scores = oracle.score(rollout, device=None).rewards  # the same scores on CPU
    torch.testing.assert_close(cpu_scores, gpu_scores, atol=1e-4, rtol=1e-4)


def test_demo_with_a_reward_model_oracle_on_gpu(tmp_path, tiny_classifier_dir):
    run(
        "fit", "--config", DEMO, *GPU, "--data.oracle=sppo_lightning.rewards.RewardModelOracle",
        f"--data.oracle.init_args.model_name_or_path={tiny_classifier_dir}", f"--trainer.default_root_dir={tmp_path}",
    )  # fmt: skip
    assert len(val_accuracies(tmp_path)) == 4


@pytest.mark.parametrize("attn", ["varlen_attn", "flash_attention_2"])
def test_packed_rows_equal_padded_rows_in_bf16_under_each_varlen_kernel(attn):
    """Tiny Qwen2 (GQA, one sliding-window layer) in bf16 on the GPU, under gradient checkpointing: packed rows
    through torch's varlen_attn (or flash-attn 2) give the padded sdpa rows' log-probs to 1e-2."""
    if attn not in usable_backends():
        pytest.skip(f"{attn} is not usable here")
    from transformers import AutoModelForCausalLM, Qwen2Config

    from sppo_lightning.data.batching import collate
    from sppo_lightning.logprobs import packed_token_logps, response_token_logps
    from tests.test_logprobs import ROWS

    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                         max_window_layers=1, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.load_implementation(attn))
    model = model.to("cuda", torch.bfloat16)
    attention.install(model, attn)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # the config has no dropout
    b = collate(ROWS, pad_id=0)
    rows = [t.cuda() for t in (b.input_ids, b.attention_mask, b.response_mask)]
    padded = response_token_logps(model, *rows)
    packed = packed_token_logps(model, *rows, b.prompt_lengths.cuda())
    packed.sum().backward()  # the recomputation runs the same kernel (it raised CheckpointError before)
    torch.testing.assert_close(packed.float(), padded.float(), atol=1e-2, rtol=1e-2)


def test_prepared_gpu_check_passes_on_this_gpu(tmp_path):
    """``benchmarks/gpu_check.py`` for real: every row trains with finite losses, packed equals padded to 1e-2 in
    bf16 (its exit status says so); its table is printed for the README's GPU table."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
