"""The policy's weights into a colocated ``sglang.Engine``, in memory.

Order (what SGLang >= 0.5.21 requires and verl's rollout does): open a weight-update session
(``begin_weight_update``), push every parameter whole with ``update_weights_from_tensor`` in buckets of at most
``max_bytes`` (never a second full copy), close the session (``end_weight_update``). Outside a session SGLang answers
``(False, message)`` and changes nothing, so every answer is checked. An SGLang without session methods (older
releases) takes the pushes directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from sppo_lightning import lora
from sppo_lightning.rollout.sglang.requests import check_result

# Module names that wrappers insert into parameter names: FSDP1 units, activation checkpointing, torch.compile.
# SGLang's loaders look names up as Hugging Face writes them and skip the ones they do not know without a word.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def hf_name(name: str) -> str:
    """``name`` as Hugging Face (and SGLang's loader) spells it, without wrapper modules."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def named_full_tensors(
    policy: torch.nn.Module, dtype: torch.dtype, device: torch.device | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, whole tensor in dtype)`` one parameter at a time.

    A DTensor shard (FSDP2) is all-gathered here, so every rank must iterate in step. A shard kept in CPU memory
    (``model.fsdp_cpu_offload``) is first moved to ``device``: an NCCL group cannot gather CPU tensors. FSDP1's flat
    shards must be gathered around this (``SPPOModule.full_parameters``); its names carry wrapper modules, removed.
    A LoRA policy (PEFT) yields the merged weights under the base model's names (``lora.merged_tensors``, merged in
    float32 before the cast), never merging the policy itself.
    """
    named = _whole_tensors(policy, device)
    if lora.is_peft(policy):
        named = lora.merged_tensors(named, lora.scalings(policy))
    for name, tensor in named:
        yield name, tensor.to(dtype)


def _whole_tensors(policy: torch.nn.Module, device: torch.device | None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in policy.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 / DTensor
            if device is not None and tensor.device != device:
                tensor = tensor.to(device)
            tensor = tensor.full_tensor()
        elif device is not None and tensor.device != device:  # FSDP1 summoned to CPU, or an unsharded CPU policy
            tensor = tensor.to(device)
        yield hf_name(name), tensor


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of at most ``max_bytes`` (a larger tensor travels alone)."""
    current, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            yield current
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    if current:
        yield current


def has_weight_update_sessions(engine) -> bool:
    """Whether this SGLang wants pushes inside ``begin_weight_update`` / ``end_weight_update`` (>= 0.5.21)."""
    return callable(getattr(engine, "begin_weight_update", None)) and callable(
        getattr(engine, "end_weight_update", None)
    )


def push_weights(engine, named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> int:
    """Send ``named`` to ``engine`` in buckets inside one weight-update session; returns the number of tensors.

    The cache is not flushed here (``flush_cache=False`` on every bucket): the caller flushes once, after the KV
    cache is resident again.
    """
    sessions = has_weight_update_sessions(engine)
    if sessions:
        check_result(engine.begin_weight_update(), "begin_weight_update")
    count = 0
    for bucket in buckets(named, max_bytes):
        check_result(
            engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False), "update_weights_from_tensor"
        )
        count += len(bucket)
    if sessions:
        check_result(engine.end_weight_update(), "end_weight_update")
    return count
