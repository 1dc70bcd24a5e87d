"""The install lines the README gives resolve against the package registry, wheels only (nothing compiles on a fresh
machine), as ``pip install --dry-run --ignore-installed --only-binary=:all: --report`` sees them: metadata only, no
package downloaded. Skipped when the registry cannot be reached. Minutes each (pip fetches the metadata of every
package of the stack, from PyPI: 7.4 min for the CPU line, 12 min for the GPU line on the shared, loaded 2-core
development machine; deselect with ``-m "not registry"``)."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.test_cli import REPO

pytestmark = [pytest.mark.slow, pytest.mark.registry]


def resolve(extras: str, tmp_path) -> dict[str, dict]:
    """name -> the report entry of everything ``pip install -e ".[extras]"`` would install on an empty environment."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--quiet",
           "--report", str(report), "-e", f"{REPO}[{extras}]"]  # fmt: skip
    # as on a fresh machine: no pip configuration of this one (its own wheel folders, mirrors and constraints)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**env, "PIP_CONFIG_FILE": os.devnull})
    if proc.returncode != 0:
        unreachable = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution")
        if any(s in proc.stderr for s in unreachable):
            pytest.skip(f"the package registry is unreachable: {proc.stderr.strip().splitlines()[-1]}")
        raise AssertionError(f"pip cannot resolve .[{extras}]:\n{proc.stderr[-3000:]}")
    entries = json.loads(report.read_text())["install"]
    return {re.sub(r"[-_.]+", "-", e["metadata"]["name"]).lower(): e for e in entries}


def wheel(entry: dict) -> str:
    return entry["download_info"]["url"].rsplit("/", 1)[-1]


def test_the_cpu_install_line_resolves_to_wheels_with_the_pinned_cpu_torch(tmp_path):
    """``pip install -e ".[dev]"`` (and the benchmarks' ``.[bench]``), together: torch 2.13.0, TRL for the bench."""
    installs = resolve("dev,bench", tmp_path)
    assert installs["torch"]["metadata"]["version"] == "2.13.0"
    assert "trl" in installs and "pytest" in installs
    assert all(wheel(e).endswith(".whl") for name, e in installs.items() if name != "sppo-lightning")


def test_the_gpu_install_line_resolves_to_wheels_without_flash_attn(tmp_path):
    """``pip install -e ".[sglang,gpu,datasets,pairrm]"``: an SGLang release the contract tests check, the torch it
    pins (CUDA 13 wheels from 0.5.22 on: NVIDIA driver 580 or newer), its manylinux_2_34 wheel (glibc 2.34 or
    newer), and no ``flash-attn`` sdist: only sglang's own ``flash-attn-4``."""
    installs = resolve("sglang,gpu,datasets,pairrm", tmp_path)
    sglang = installs["sglang"]["metadata"]["version"]
    assert sglang in ("0.5.21", "0.5.22", "0.5.23")
    assert "manylinux_2_34" in wheel(installs["sglang"])
    assert "flash-attn" not in installs and "flash-attn-4" in installs
    assert all(wheel(e).endswith(".whl") for name, e in installs.items() if name != "sppo-lightning")
    torch = installs["torch"]["metadata"]["version"]
    assert torch == {"0.5.21": "2.13.0", "0.5.22": "2.14.1", "0.5.23": "2.14.1"}[sglang]  # 0.5.23: Python >= 3.11
    assert installs["nvidia-cuda-runtime"]["metadata"]["version"].startswith("13.")  # CUDA 13: driver >= 580
