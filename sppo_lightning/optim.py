"""The optimizer's two policies, as pure functions: which parameters are decayed, and the learning-rate warm-up.

Weight-decay groups are decided from each parameter's shape *before* any sharding wrapper touched it, looked up by
name: FSDP1 flattens its local shards to 1-D, so a rule on the live tensor (``p.ndim >= 2``) would put every
parameter in the no-decay group there while FSDP2 (DTensors keep the global shape) and a single process decay the
matrices.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

DecayOn = Literal["matrices", "all"]
WarmupUnit = Literal["step", "rollout"]

# Path segments that sharding and checkpointing wrappers insert into parameter names (FSDP1, activation
# checkpointing, torch.compile); the name a parameter had before wrapping is its name without them.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """``model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def param_ndims(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Each parameter's number of dimensions by clean name: record it before wrapping, for ``decay_groups``."""
    return {clean_name(name): p.ndim for name, p in named_parameters}


def _no_decay_by_name(name: str) -> bool:
    """For a parameter nobody recorded: biases and norm weights by their names."""
    parts = name.lower().split(".")
    return parts[-1] == "bias" or any("norm" in part or part.startswith("ln") for part in parts[:-1])


def decay_groups(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
    decay_on: DecayOn = "matrices",
    ndims: dict[str, int] | None = None,
) -> list[dict]:
    """AdamW parameter groups: ``[{params, weight_decay, names}, {params, 0.0, names}]`` (frozen parameters left out).

    ``decay_on="matrices"`` decays parameters of two or more dimensions (weights of linear layers and embeddings)
    and spares biases and norm weights; ``"all"`` decays every parameter, as verl's actor does
    (``build_optimizer(module.parameters(), weight_decay=...)``). ``ndims``: the shapes recorded before wrapping
    (``param_ndims``); a parameter missing from it is judged by its live shape if that has 2+ dimensions, else by
    its name.
    """
    decay, no_decay = {"params": [], "names": []}, {"params": [], "names": []}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        name = clean_name(name)
        if decay_on == "all":
            decayed = True
        elif ndims is not None and name in ndims:
            decayed = ndims[name] >= 2
        else:
            decayed = p.ndim >= 2 or not _no_decay_by_name(name)
        group = decay if decayed else no_decay
        group["params"].append(p)
        group["names"].append(name)
    return [{**decay, "weight_decay": weight_decay}, {**no_decay, "weight_decay": 0.0}]


def warmup_factor(index: int, warmup: int, unit: WarmupUnit = "step") -> float:
    """The learning-rate multiplier of the ``index``-th (0-based) optimizer step or rollout; constant after warm-up.

    1. ``unit="step"``: (index + 1) / warmup per optimizer step, so the first step already moves (lr / warmup).
    2. ``unit="rollout"``: index / warmup per rollout, verl's ``get_constant_schedule_with_warmup`` stepped once
       per ``update_actor``: the first rollout trains at lr 0, rollout ``warmup`` (0-based) at the full rate.
    """
    if warmup <= 0:
        return 1.0
    done = index + 1 if unit == "step" else index
    return min(1.0, done / warmup)
