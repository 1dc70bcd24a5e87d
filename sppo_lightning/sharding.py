"""Sharding the policy over processes: FSDP2 (Lightning's ``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``).

Both give one FSDP unit per decoder layer (its all-gather overlaps the previous layer's compute) plus a root for the
embeddings, final norm and head. They differ in where whole weights can be read: FSDP2's parameters are DTensors
that gather on request anywhere, while FSDP1 gathers its root unit's parameters only inside the wrapper's forward
(``run_with_policy``) and the others inside ``summon_full_params`` (``full_parameters``).

Only Lightning's public API is used here: the wrapper is ``trainer.strategy.model``, the FSDP2 mesh
``LightningModule.device_mesh``. One piece of torch's is private: FSDP1's ``TrainingState``, the only way to tell
whether a call already runs inside the wrapper's forward (``run_with_policy``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning.errors import ConfigError

POLICY_PREFIX = "policy."  # the policy's keys in the LightningModule's state dict


def decoder_layers(policy: torch.nn.Module, what: str) -> torch.nn.ModuleList:
    if callable(getattr(policy, "get_base_model", None)):  # a LoRA policy (PEFT): the layers of the model inside
        policy = policy.get_base_model()
    layers = getattr(getattr(policy, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"{what} sharding expects a decoder model with .model.layers; {type(policy).__name__} has none"
        )
    return layers


TP_KEY = "trainer.strategy.init_args.tensor_parallel_size"


def check_parallel_layout(strategy, devices_per_node: int, nodes: int) -> None:
    """Refuse a ``ModelParallelStrategy`` whose tensor-parallel size is above 1: the policy is sharded with FSDP2 over
    ``data_parallel`` only, never split by tensor parallelism, so the ranks of a tensor-parallel group would each
    train their own copy on their own rows and drift apart. Lightning's defaults ("auto") resolve to data_parallel =
    nodes and tensor_parallel = devices per node (``ModelParallelStrategy.setup_environment``), which is that case
    as soon as a node has 2 devices. Read before the processes start; sizes are Lightning's (private) settings."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return
    given = strategy._tensor_parallel_size
    tp = devices_per_node if given == "auto" else int(given)
    if tp > 1:
        world = devices_per_node * nodes
        raise ConfigError(
            f"{TP_KEY}={given} means tensor parallel size {tp}, but the policy is only sharded with FSDP over "
            f"data_parallel (no tensor parallelism is applied: those ranks would train apart); set "
            f"trainer.strategy.init_args.data_parallel_size={world} (all devices) and {TP_KEY}=1"
        )


def data_parallel_mesh(device_mesh):
    """The mesh FSDP2 shards over; a tensor-parallel dimension above 1 is refused (see ``check_parallel_layout``),
    for runs built in Python that the CLI did not check."""
    names = device_mesh.mesh_dim_names or ()
    tp = device_mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    if tp > 1:
        raise ConfigError(
            f"{TP_KEY}={tp}, but the policy is only sharded with FSDP over data_parallel (no tensor parallelism is "
            f"applied); set trainer.strategy.init_args.data_parallel_size={device_mesh.size()} (all devices) and "
            f"{TP_KEY}=1"
        )
    return device_mesh["data_parallel"]


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
    # A LoRA policy's root is the transformers model inside PEFT's wrapper: PEFT's generate calls that model's
    # forward directly, where FSDP2's root hook must gather the embeddings (the wrapper holds no parameter of its own)
    fully_shard(policy.get_base_model() if callable(getattr(policy, "get_base_model", None)) else policy, **kwargs)
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


def fsdp1_mixed_precision(strategy: FSDPStrategy) -> None:
    """FSDP1 under ``bf16-mixed`` / ``16-mixed``: compute in the low precision, but reduce gradients and keep buffers
    (the rotary ``inv_freq``) in float32, as FSDP2 (``fully_shard_policy``) and verl do. Lightning's ``FSDPPrecision``
    casts all three to the low precision (``mixed_precision_config``): gradients summed over ranks in bf16 and RoPE
    frequencies rounded to 8 bits of mantissa. A ``mixed_precision`` given to the strategy is kept."""
    from torch.distributed.fsdp import MixedPrecision

    low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(strategy.precision_plugin.precision)
    if strategy.mixed_precision is not None or low is None:
        return
    strategy.mixed_precision = MixedPrecision(param_dtype=low, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
    rank_zero_info(f"FSDP1: parameters computed in {low}, gradients reduced and buffers kept in torch.float32")


def fsdp1_root(trainer) -> torch.nn.Module | None:
    """The ``FullyShardedDataParallel`` (FSDP1) wrapper around the LightningModule under ``FSDPStrategy``, else None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = trainer.strategy.model if trainer is not None else None
    return wrapper if isinstance(wrapper, FullyShardedDataParallel) else None


def run_inside_forward(root: torch.nn.Module, module: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """``fn()``, called from inside ``root``'s forward, where ``root`` wraps ``module``.

    FSDP1 gathers its root unit's parameters (embeddings, final norm, head) in the wrapper's forward and frees them
    after it, so code that runs the policy outside a Lightning step must run there. For the one call, ``module``'s
    ``forward`` (which the wrapper calls) is replaced by ``fn``; the real one is put back before ``fn`` runs, in case
    ``fn`` calls it. This is what Lightning does to run ``training_step`` under a wrapper (its private
    ``_ForwardRedirection``).
    """
    shadowed = "forward" in vars(module)  # an instance attribute hides the class's forward; keep whichever it is
    saved = vars(module).get("forward")

    def restore() -> None:
        if shadowed:
            module.forward = saved
        else:
            vars(module).pop("forward", None)

    def forward(*args, **kwargs) -> Any:
        restore()
        return fn()

    module.forward = forward
    try:
        return root()
    finally:
        restore()


def run_with_policy(trainer, fn: Callable[[], Any]) -> Any:
    """``fn()``, which runs the policy outside a Lightning step, where its weights can be used: through the FSDP1
    root's forward (``run_inside_forward``) unless already inside it (a training or validation step); elsewhere
    ``fn`` is simply called."""
    from torch.distributed.fsdp._common_utils import TrainingState

    root = fsdp1_root(trainer)
    if root is None or root.training_state != TrainingState.IDLE:
        return fn()
    return run_inside_forward(root, trainer.lightning_module, fn)


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


def clip_fsdp1_grad_norm(trainer, clip_val: float | None, algorithm: str | None) -> bool:
    """Clip the gradient norm to ``clip_val`` under FSDP1, where Lightning's precision plugin refuses norm clipping:
    the wrapper computes the norm over all shards. False when this does not apply (the caller clips as Lightning
    does)."""
    root = fsdp1_root(trainer)
    if root is None or not clip_val or algorithm not in (None, "norm"):
        return False
    root.clip_grad_norm_(clip_val)
    return True


def sum_over_ranks(trainer, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every rank, back on the device they came from (reduced on the strategy's device: NCCL
    has no CPU tensors); ``values`` itself in one process."""
    if trainer is None or trainer.world_size == 1:
        return values
    strategy = trainer.strategy
    return strategy.reduce(values.to(strategy.root_device), reduce_op="sum").to(values.device)


def global_grad_norm(grads: list[torch.Tensor], trainer, device) -> torch.Tensor:
    """The norm of the whole gradient, the same on every rank, from this rank's (possibly sharded) gradients."""
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    if hasattr(norm, "full_tensor"):  # FSDP2: a norm over DTensor shards
        return norm.full_tensor()
    if fsdp1_root(trainer) is not None:  # FSDP1: every rank holds plain shards of the gradients
        return trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
    return norm
