"""Parallel layouts and precision under sharding (``sppo_lightning.sharding``): what runs is what the config says."""

import json

import pytest

from tests import forked
from tests.test_cli import DEMO, REPO, run

FSDP = str(REPO / "configs" / "fsdp_cpu.yaml")
TP_KEY = "trainer.strategy.init_args.tensor_parallel_size"


@pytest.mark.parametrize(
    "layout",
    [
        ["--trainer.strategy.init_args.data_parallel_size=1", f"--{TP_KEY}=2"],
        # Lightning's defaults: data_parallel = nodes (1), tensor_parallel = devices per node (2)
        ["--trainer.strategy.init_args.data_parallel_size=auto", f"--{TP_KEY}=auto"],
    ],
    ids=["tp=2", "auto"],
)
def test_tensor_parallel_layout_is_refused_by_name(tmp_path, layout):
    """Issue #28: the policy is only sharded over data_parallel, so a 1 x 2 mesh trained two diverging copies with no
    warning. Refused before any process starts: one line naming the key and the fix, exit 2."""
    proc = run(
        "fit", "--config", DEMO, "--config", FSDP, *layout, f"--trainer.default_root_dir={tmp_path}", check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert TP_KEY in errors[0] and "data_parallel_size=2 (all devices)" in errors[0]
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


@pytest.mark.slow
def test_fsdp1_bf16_mixed_keeps_buffers_and_gradient_reduction_in_float32(tmp_path):
    """configs/fsdp1.yaml's bf16-mixed under FSDP1 (2 CPU processes, tests/cpu_fsdp1.py): layers compute in bf16, but
    the gradients go through the reduce-scatter in float32 and the rotary inv_freq stays float32 after a step, as
    under FSDP2. Lightning's own FSDPPrecision made all three bf16 (0.37 % error on the RoPE frequencies)."""
    out = tmp_path / "precision.json"
    proc = forked.run([str(REPO / "tests" / "fsdp1_precision.py"), f"--out={out}"], timeout=900, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == {"inv_freq": "torch.float32", "reduced": ["torch.float32"], "compute": ["torch.bfloat16"]}
