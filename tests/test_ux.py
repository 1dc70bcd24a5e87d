"""Experiment UX through the real CLI: wandb sweeps' arguments, the offline wandb run, no secret anywhere."""

import os
import time
from pathlib import Path

import pytest
import yaml

from tests.test_cli import DEMO, REPO, SHORT, run

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def agent_args(sweep: dict) -> dict[str, object]:
    """One point of the search space, as a wandb agent would sample it."""
    point = {}
    for name, spec in sweep["parameters"].items():
        point[name] = spec["value"] if "value" in spec else spec["values"][-1] if "values" in spec else spec["max"]
    return point


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_arguments_land_in_the_resolved_config(path, tmp_path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and sweep["metric"]["name"] == "val/accuracy"
    command = sweep["command"]
    fixed = command[command.index("${program}") + 1 : command.index("${args}")]  # fit --config ... as written
    point = agent_args(sweep)
    args = [f"--{name}={value}" for name, value in point.items()]  # the agent's ${args}: --name=value
    printed = yaml.safe_load(run(*fixed, *args, f"--trainer.default_root_dir={tmp_path}", "--print_config").stdout)
    for name, value in point.items():
        section, key = name.split(".")
        assert printed[section][key] == pytest.approx(value), name


@pytest.mark.slow
def test_offline_wandb_run_has_the_resolved_config_and_no_secret(tmp_path):
    secret = "wandb-key-DO-NOT-LEAK-8c1e"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env["WANDB_API_KEY"] = secret
    # with a key present the logger would go online (no network here): the same overlay, forced offline
    overlay = yaml.safe_load((REPO / "configs" / "wandb.yaml").read_text())
    overlay["trainer"]["logger"][1]["init_args"]["offline"] = True
    (tmp_path / "wandb_offline.yaml").write_text(yaml.safe_dump(overlay))
    proc = run(
        "fit", "--config", DEMO, "--config", str(tmp_path / "wandb_offline.yaml"), *SHORT,
        f"--trainer.default_root_dir={tmp_path}", env=env,
    )  # fmt: skip
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [record] = run_dir.glob("run-*.wandb")
    # wandb's service process writes the record; on a loaded machine it may still be flushing when fit returns
    deadline = time.monotonic() + 60
    while b"samples_per_prompt" not in (data := record.read_bytes()) and time.monotonic() < deadline:
        time.sleep(1)
    assert b"logprobs_from_rollout" in data and b"samples_per_prompt" in data  # the resolved config went along
    assert secret not in proc.stdout + proc.stderr
    for path in Path(tmp_path).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
