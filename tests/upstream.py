"""Released upstream packages, fetched as wheels without installing them, for contract and oracle tests.

SGLang and verl cannot be installed here (GPU-only dependencies, half a gigabyte), but their wheels can be downloaded
from the package registry and read: tests parse SGLang's released source to check our calls against it, and run
verl's plain-Python scorer as an oracle. Wheels are cached under ``$SPPO_WHEEL_CACHE`` (default
``~/.cache/sppo-lightning/wheels``) so only the first run reaches the registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("SPPO_WHEEL_CACHE", Path.home() / ".cache" / "sppo-lightning" / "wheels"))


def released_source(name: str, version: str) -> Path:
    """The unpacked wheel of ``name==version`` (a folder holding its top-level packages).

    Skips the calling test, with the reason, when the registry cannot be reached and nothing is cached.
    """
    root = CACHE / f"{name}-{version}"
    done = root / ".unpacked"
    if done.exists():
        return root
    download = CACHE / "download"
    download.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        result = subprocess.run([*cmd, f"{name}=={version}", "-d", str(download)], capture_output=True, text=True)
        wheels = sorted(download.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if result.returncode != 0 or not wheels:
            pytest.skip(f"could not download {name}=={version} from the package registry: {result.stderr[-300:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(root)
    done.touch()
    return root
