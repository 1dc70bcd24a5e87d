"""FSDP2 (Lightning's ModelParallelStrategy) and FSDP1 (FSDPStrategy) on 2 CPU processes over gloo.

Each check runs the real script or CLI in its own processes (tests/forked.py): the README's demo through Lightning's
launcher, which starts rank 1 itself, the others with both ranks started as torchrun would. Not exercised here: NCCL
and bf16 mixed precision, which only exist on a GPU (tests/test_gpu.py).
"""

import pytest
import torch

from sppo_lightning.toy import MODEL_DIR
from tests import forked
from tests.test_cli import DEMO, REPO, read_metrics, run, val_accuracies

FSDP = str(REPO / "configs" / "fsdp_cpu.yaml")


def one_step(tmp_path, devices: int, *flags: str) -> dict:
    out = tmp_path / f"step_{devices}{''.join(flags)}.pt"
    script = [str(REPO / "tests" / "fsdp_one_step.py"), "--devices", str(devices), "--out", str(out), *flags]
    proc = forked.run(script, ranks=devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        (), ("--cpu-offload",), ("--packed",), ("--uneven",), ("--packed", "--checkpointing"),
        ("--packed", "--checkpointing", "--no-share-prompt"),
    ],
    ids=[
        "sharded", "sharded+cpu-offload", "sharded+packed", "sharded, 12+4 rows", "sharded+packed+checkpointing",
        "sharded+packed whole rows+checkpointing",
    ],
)  # fmt: skip
def test_sharded_step_equals_single_process(tmp_path, flags):
    """Same global batch: the first loss, its gradients and the parameters after one AdamW step match the unsharded
    run (with the sharded parameters, gradients and optimizer state offloaded to CPU memory too; with packed rows
    against the padded single process, also under gradient checkpointing, whose recomputation must run the same
    per-row attention; with 12 rows on one rank and 4 on the other, each row still weighing 1/16)."""
    single, sharded = one_step(tmp_path, 1), one_step(tmp_path, 2, *flags)
    assert sharded["sharded"] and not single["sharded"]  # parameters really were DTensors
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert single["params"].keys() == sharded["params"].keys() and single["grads"].keys() == sharded["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    for name, p in single["params"].items():
        # AdamW's first step is about lr·sign(g): where |g| is near its eps (1e-8), rounding flips it, so only
        # parameters with a gradient well above eps are compared
        grad = single["grads"].get(name, single["grads"]["model.embed_tokens.weight"])  # the tied head has none
        clear = grad.abs() > 1e-6
        torch.testing.assert_close(sharded["params"][name][clear], p[clear], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", ["fsdp2", "fsdp1"])
def test_weight_decay_groups_are_the_single_process_ones_under_fsdp(tmp_path, fsdp):
    """Issue #22: FSDP1's local shards are 1-D, so deciding decay on the live tensors spared every parameter there.
    The groups are decided on the shapes recorded before wrapping: the same names as one process, under both."""
    flags = ("--weight-decay=0.01", "--fsdp1") if fsdp == "fsdp1" else ("--weight-decay=0.01",)
    single, sharded = one_step(tmp_path, 1, "--weight-decay=0.01"), one_step(tmp_path, 2, *flags)
    decayed, spared = single["decay_names"]
    assert decayed and spared and all(n.endswith(".bias") or "norm" in n for n in spared)  # the matrices decay
    assert [sorted(g) for g in sharded["decay_names"]] == [sorted(decayed), sorted(spared)]
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_demo_learns_like_single_process_and_exports(tmp_path):
    """The README's command for 2 epochs: sharded, checkpointed as shards, exported, accuracy near single process."""
    args = ["--trainer.max_epochs=2", "--data.val.init_args.num_prompts=200", "--data.val_batch_size=200"]
    proc = run("fit", "--config", DEMO, "--config", FSDP, f"--trainer.default_root_dir={tmp_path / 'fsdp'}", *args)
    assert "sharded over data_parallel=2" in proc.stdout + proc.stderr
    run("fit", "--config", DEMO, f"--trainer.default_root_dir={tmp_path / 'single'}", *args)

    assert abs(val_accuracies(tmp_path / "fsdp")[-1] - val_accuracies(tmp_path / "single")[-1]) <= 0.05
    last = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard per rank
    assert (tmp_path / "fsdp" / "hf_model" / "model.safetensors").is_file()

    # the shards resume: one more iteration from last.ckpt continues the same run (epoch 2 of 3)
    run("fit", "--config", DEMO, "--config", FSDP, f"--trainer.default_root_dir={tmp_path / 'fsdp'}", *args,
        "--trainer.max_epochs=3", "--ckpt_path=last")  # fmt: skip
    assert len(val_accuracies(tmp_path / "fsdp")) == 4  # before, after 1, after 2, then after 3 in a new version


@pytest.mark.slow
def test_validation_on_two_processes_counts_each_prompt_once(tmp_path):
    """51 validation prompts over 2 ranks (26 + 25, batches of 10): accuracy overall and by level are one process's
    figures (18/51), not those of a set padded with a duplicate prompt (18/52)."""
    val = ["--data.val.init_args.num_prompts=51", "--data.val_batch_size=10"]
    run("validate", "--config", DEMO, "--config", FSDP, *val, f"--trainer.default_root_dir={tmp_path / 'two'}", ranks=2)
    run("validate", "--config", DEMO, *val, f"--trainer.default_root_dir={tmp_path / 'one'}")
    two, one = [
        {k: float(v) for k, v in row.items() if k.startswith("val/")}
        for row in read_metrics(tmp_path / "two") + read_metrics(tmp_path / "one")
    ]
    assert one.keys() == {"val/accuracy", *(f"val/accuracy/level_{i}" for i in (1, 2, 3))}
    assert one["val/accuracy"] == pytest.approx(18 / 51) and two == one


def test_fsdp1_defaults_to_one_unit_per_decoder_layer_and_keeps_a_given_policy(tiny_model_dir):
    """FSDPStrategy's auto_wrap_policy cannot be written in YAML: the module supplies one unit per decoder layer."""
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers import AutoModelForCausalLM

    from sppo_lightning.sharding import default_fsdp1_wrap_policy

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    strategy = FSDPStrategy()
    default_fsdp1_wrap_policy(policy, strategy)
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert all(wrap(layer, recurse=False, nonwrapped_numel=0) for layer in policy.model.layers)
    assert not wrap(policy.model.embed_tokens, recurse=False, nonwrapped_numel=0)

    def given(*args, **kwargs):
        return False

    strategy = FSDPStrategy(auto_wrap_policy=given)
    default_fsdp1_wrap_policy(policy, strategy)
    assert strategy.kwargs["auto_wrap_policy"] is given


FSDP1_ON_CPU = """
# what configs/fsdp1.yaml needs changed to run on 2 CPU processes
trainer:
  accelerator: cpu
  devices: 2
  precision: 32-true
  strategy:
    class_path: tests.cpu_fsdp1.CPUFSDPStrategy   # keeps fsdp1.yaml's init_args
  callbacks:   # the end-of-fit HF export is left out: FSDP1's full state dict crashes in torch on CPU (fine on GPU)
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: ${....default_root_dir}/checkpoints
        save_top_k: 1
        save_last: link
data:
  micro_batch_size: 32
"""


@pytest.mark.slow
def test_fsdp1_on_two_cpu_processes_learns_and_its_shards_export(tmp_path):
    """configs/fsdp1.yaml with Lightning's CPU refusal lifted (tests/cpu_fsdp1.py): the rollout and the π_t pass run
    through the FSDP1 root's forward, the gradient norm is clipped through the wrapper, last.ckpt is a folder of
    shards, and the exporter turns it into a folder that from_pretrained loads."""
    from transformers import AutoModelForCausalLM

    from sppo_lightning.export import export_checkpoint

    overlay = tmp_path / "fsdp1_cpu.yaml"
    overlay.write_text(FSDP1_ON_CPU)
    root = tmp_path / "fsdp1"
    configs = ["--config", DEMO, "--config", str(REPO / "configs" / "fsdp1.yaml"), "--config", str(overlay)]
    proc = run("fit", *configs, "--trainer.max_epochs=2", f"--trainer.default_root_dir={root}", ranks=2)
    assert "FSDP1: one unit per Qwen2DecoderLayer" in proc.stdout + proc.stderr
    acc = val_accuracies(root)
    assert len(acc) == 3 and acc[-1] > acc[0]
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    export_checkpoint(last, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(moved) == len(list(base.parameters()))  # every parameter was trained, none lost in the shards
