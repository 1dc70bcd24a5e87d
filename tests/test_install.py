"""The install lines the README gives resolve against the package registry, wheels only (nothing compiles on a fresh
machine), for the machine each line is for: the CPU line for this one, the GPU lines for an x86_64 Linux GPU machine.

The resolver is uv's (`uv pip compile`, in the dev extra): it reads each package's metadata without downloading its
wheels and resolves for a named platform and Python, so the GPU lines are checked for the machine they are for,
from this CPU machine, in seconds. ``pip install --dry-run --ignore-installed --report`` gives the same versions
here but took 7.4 and 12 minutes for these two lines on the 2-core development machine (it fetched the stack's
wheels from the registry). Skipped when the registry cannot be reached.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_MACHINE = "x86_64-manylinux_2_34"  # what sglang's wheels are built for (glibc 2.34, Ubuntu 22.04 / Debian 12 on)
UNREACHABLE = ("dns error", "Failed to fetch", "Connection refused", "error sending request", "timed out")


def _uv() -> str:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(uv).exists():
        pytest.skip("uv is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return uv


def resolve(extras: list[str], python: str = "3.11", platform: str = GPU_MACHINE) -> dict[str, str] | str:
    """name -> version of everything ``pip install -e ".[extras]"`` installs on a fresh ``platform`` machine with
    ``python``, wheels only; or uv's message when it cannot be resolved."""
    cmd = [_uv(), "pip", "compile", "--no-config", "--quiet", "--no-header", "--no-annotate", "--only-binary", ":all:",
           "--python-version", python, "--python-platform", platform, str(REPO / "pyproject.toml"),
           *(f"--extra={e}" for e in extras)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if any(s in proc.stderr for s in UNREACHABLE):
            pytest.skip(f"the package registry is unreachable: {proc.stderr.strip().splitlines()[-1]}")
        return proc.stderr
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", proc.stdout, re.M)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_the_cpu_install_line_resolves_with_the_pinned_cpu_torch(python):
    """``pip install -e ".[dev]"`` on the Pythons ``requires-python`` (>= 3.11) admits and torch 2.13.0 has wheels
    for; 3.10 is refused by name (TRL 1.16 in the dev extra and sglang 0.5.22+ need 3.11)."""
    installs = resolve(["dev"], python=python, platform="x86_64-manylinux_2_28")
    assert isinstance(installs, dict), installs
    assert installs["torch"] == "2.13.0"
    assert {"pytest", "ruff", "peft", "uv", "trl"} <= installs.keys()


def test_python_3_10_does_not_resolve():
    """requires-python says 3.11: on 3.10 TRL 1.16 (dev extra) has no release, nor has sglang 0.5.22+ (0.5.21, the
    last for 3.10, needs cuda-tile 1.6.0rc5, which has no wheel)."""
    refused = resolve(["dev"], python="3.10", platform="x86_64-manylinux_2_28")
    assert isinstance(refused, str) and "3.11" in refused


def test_the_gpu_install_lines_resolve_without_flash_attn():
    """``pip install -e ".[sglang,datasets]"`` and ``".[sglang,datasets,pairrm]"`` on a GPU machine with Python 3.11:
    an SGLang release the contract tests check, the torch it pins (CUDA 13 wheels: NVIDIA driver 580 or newer),
    and no ``flash-attn`` sdist to build: only sglang's own ``flash-attn-4``."""
    for extras in (["sglang", "datasets"], ["sglang", "datasets", "pairrm"], ["sglang", "gpu", "datasets"]):
        installs = resolve(extras)
        assert isinstance(installs, dict), installs
        assert installs["sglang"] in ("0.5.21", "0.5.22", "0.5.23")
        assert installs["torch"] == {"0.5.21": "2.13.0", "0.5.22": "2.14.1", "0.5.23": "2.14.1"}[installs["sglang"]]
        assert installs["nvidia-cuda-runtime"].startswith("13.")  # CUDA 13: driver >= 580
        assert "flash-attn" not in installs and "flash-attn-4" in installs


def test_the_gpu_stack_needs_glibc_2_34():
    """What the docs say the GPU machine needs: with a glibc older than 2.34 there is no sglang wheel at all."""
    older_glibc = resolve(["sglang"], platform="x86_64-manylinux_2_28")
    assert isinstance(older_glibc, str) and "sglang" in older_glibc
