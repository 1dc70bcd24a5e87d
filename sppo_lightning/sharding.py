"""Sharding the policy over processes: FSDP2 (Lightning's ``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``).

Both give one FSDP unit per decoder layer (its all-gather overlaps the previous layer's compute) plus a root for the
embeddings, final norm and head. They differ in where whole weights can be read: FSDP2's parameters are DTensors
that gather on request anywhere, while FSDP1 gathers its root unit's parameters only inside the wrapper's forward
(see ``SPPOModule.run_with_policy``) and the others inside ``summon_full_params``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning.errors import ConfigError

POLICY_PREFIX = "policy."  # the policy's keys in the LightningModule's state dict


def decoder_layers(policy: torch.nn.Module, what: str) -> torch.nn.ModuleList:
    layers = getattr(getattr(policy, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"{what} sharding expects a decoder model with .model.layers; {type(policy).__name__} has none"
        )
    return layers


def fully_shard_policy(policy: torch.nn.Module, mesh, param_dtype: str | None, cpu_offload: bool) -> None:
    """FSDP2: parameters become DTensors sharded over ``mesh``; layers compute in ``param_dtype`` (None: the
    stored dtype) and reduce gradients in float32; ``cpu_offload`` keeps shards, gradients and optimizer state in
    CPU memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    layers = decoder_layers(policy, "FSDP2")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(policy, **kwargs)
    rank_zero_info(
        f"FSDP2: {len(layers)} decoder layers + root sharded over data_parallel={mesh.size()} "
        f"(compute dtype {param_dtype or next(policy.parameters()).dtype}, cpu_offload={cpu_offload})"
    )


def default_fsdp1_wrap_policy(policy: torch.nn.Module, strategy: FSDPStrategy) -> None:
    """FSDP1 makes the whole module one unit unless given an auto-wrap policy, and a YAML config cannot name a set
    of classes (jsonargparse drops the argument): default to one unit per decoder layer, as under FSDP2."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if strategy.kwargs.get("auto_wrap_policy") is None:
        layer_types = {type(layer) for layer in decoder_layers(policy, "FSDP1")}
        strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(layer_types)
        rank_zero_info(f"FSDP1: one unit per {', '.join(sorted(t.__name__ for t in layer_types))} + the root")


def fsdp1_root(trainer) -> torch.nn.Module | None:
    """The ``FullyShardedDataParallel`` (FSDP1) wrapper around the LightningModule under ``FSDPStrategy``, else None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = trainer.strategy.model if trainer is not None else None
    return wrapper if isinstance(wrapper, FullyShardedDataParallel) else None


def full_parameters(trainer) -> AbstractContextManager:
    """A context in which the policy's parameters are whole (read-only): needed under FSDP1 only, since FSDP2's
    DTensors gather on request (``full_tensor``) and unsharded parameters are whole already."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = fsdp1_root(trainer)
    return nullcontext() if root is None else FullyShardedDataParallel.summon_full_params(root, writeback=False)


def full_policy_state_dict(policy: torch.nn.Module, trainer) -> dict[str, torch.Tensor]:
    """The policy's full weights on CPU, complete on rank 0 (other ranks may get an empty dict). Under FSDP it is a
    collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    root = fsdp1_root(trainer)
    if root is None:
        return get_model_state_dict(policy, options=options)
    full = get_model_state_dict(root, options=options)  # FSDP1 shards the whole LightningModule
    return {k.removeprefix(POLICY_PREFIX): v for k, v in full.items() if k.startswith(POLICY_PREFIX)}


def global_grad_norm(grads: list[torch.Tensor], trainer, device) -> torch.Tensor:
    """The norm of the whole gradient, the same on every rank, from this rank's (possibly sharded) gradients."""
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    if hasattr(norm, "full_tensor"):  # FSDP2: a norm over DTensor shards
        return norm.full_tensor()
    if fsdp1_root(trainer) is not None:  # FSDP1: every rank holds plain shards of the gradients
        return trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
    return norm
