"""Which SGLang is installed, and what it offers.

``CHECKED`` is the range of releases whose source the contract tests (``tests/rollout/test_sglang_contract.py``)
checked our calls against; the ``sglang`` extra in ``pyproject.toml`` names the same range. Outside it the engine
warns once and goes on: the calls may still exist, nobody checked.
"""

from __future__ import annotations

import inspect
import re
import warnings

CHECKED = ("0.5.21", "0.5.23")
"""First and last SGLang release checked (inclusive)."""

INSTALL_HINT = 'SGLang is not installed: pip install "sppo-lightning[sglang]" (CUDA GPUs only)'

_warned: set[str] = set()


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.5.23.post1"`` -> ``(0, 5, 23)``: the numeric release part."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):  # "23rc1": a pre-release of 23
            break
    return tuple(parts)


def installed_version(sglang) -> str | None:
    version = getattr(sglang, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("sglang")
        except Exception:  # noqa: BLE001 - a source checkout may have no metadata
            return None
    return str(version)


def warn_if_unchecked(sglang) -> bool:
    """One warning (per version, per process) when the installed SGLang is outside ``CHECKED``; True if it is."""
    version = installed_version(sglang)
    low, high = CHECKED
    if version is not None and version_tuple(low) <= version_tuple(version)[:3] <= version_tuple(high):
        return False
    if version not in _warned:
        _warned.add(version)
        warnings.warn(
            f"SGLang {version or '(unknown version)'} is installed; sppo-lightning's SGLang engine was checked "
            f'against SGLang {low} to {high} (pip install "sppo-lightning[sglang]" installs a checked one)',
            stacklevel=3,
        )
    return True


def memory_tags(sglang) -> list[str] | None:
    """The memory kinds ``release_memory_occupation`` takes (weights, KV cache, CUDA graphs), or None for an SGLang
    that releases everything at once without tags."""
    try:
        from sglang.srt.constants import GPU_MEMORY_ALL_TYPES
    except ImportError:
        return None
    return list(GPU_MEMORY_ALL_TYPES)


def takes_keyword(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def takes_sampling_seed() -> bool:
    """Whether the installed SGLang's ``SamplingParams`` has ``sampling_seed`` (per-request seeds)."""
    try:
        from sglang.srt.sampling.sampling_params import SamplingParams
    except ImportError:
        return False
    fields = getattr(SamplingParams, "__struct_fields__", None)
    if fields is not None:  # msgspec.Struct (0.5.x)
        return "sampling_seed" in fields
    return takes_keyword(SamplingParams, "sampling_seed")
