"""Loading the policy's weights: whole in every process, or once per run and sharded under FSDP2.

One device, DDP and FSDP1 load the whole model in each process (``from_pretrained``), as before. Under FSDP2
(``ModelParallelStrategy``) that would put one full copy per rank in host memory (about 30 GB per rank for a 7B model
in float32) before sharding frees it. Instead (torchtitan's and verl's recipe):

1. every rank builds the model on the meta device from its ``config.json`` (structure only, no memory);
2. it is sharded there (``fully_shard``), then given empty memory for its own shards (``to_empty``);
3. rank 0 alone loads the checkpoint (``from_pretrained``, exactly as the unsharded path does) and every rank receives
   its shards of it, one tensor at a time (torch's ``set_model_state_dict`` with ``broadcast_from_rank0``);
4. buffers are not in the state dict when non-persistent (the rotary frequencies ``inv_freq``): rank 0's are broadcast
   too, so every value equals a normal load's.

Host memory: rank 0 holds one whole copy while it loads; the other ranks hold their shards and one whole tensor in
flight (the largest, usually the embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sppo_lightning.errors import refusing_remote_code


@dataclass(frozen=True)
class PolicySource:
    """What ``from_pretrained`` needs to build the policy (``model.*`` settings)."""

    name_or_path: str
    dtype: str = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False

    def load(self) -> torch.nn.Module:
        """The whole model with its weights, on CPU."""
        from transformers import AutoModelForCausalLM

        with refusing_remote_code(self.name_or_path, "model.trust_remote_code"):
            return AutoModelForCausalLM.from_pretrained(
                self.name_or_path,
                dtype=getattr(torch, self.dtype),
                attn_implementation=self.attn_implementation,
                trust_remote_code=self.trust_remote_code,
                use_safetensors=True,  # never unpickle a .bin from a repository
            )

    def empty(self) -> torch.nn.Module:
        """The same model on the meta device (no memory, no weights): built from the folder's config, with its
        generation config as ``from_pretrained`` would attach it."""
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        with refusing_remote_code(self.name_or_path, "model.trust_remote_code"):
            config = AutoConfig.from_pretrained(self.name_or_path, trust_remote_code=self.trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    config,
                    dtype=getattr(torch, self.dtype),
                    attn_implementation=self.attn_implementation,
                    trust_remote_code=self.trust_remote_code,
                )
        if model.can_generate():
            try:
                model.generation_config = GenerationConfig.from_pretrained(self.name_or_path)
            except OSError:  # a folder without generation_config.json keeps the one derived from the config
                pass
        return model

    def build(self, on_meta: bool) -> torch.nn.Module:
        return self.empty() if on_meta else self.load()


def load_sharded_once(
    build: Callable[[bool], torch.nn.Module], shard: Callable[[torch.nn.Module], None], device: torch.device
) -> torch.nn.Module:
    """The policy sharded by ``shard`` (FSDP2), its weights read once, by rank 0, and sent to the others' shards.

    ``build(on_meta)`` returns the model: on the meta device when ``on_meta``, else loaded with its weights on CPU;
    both must have the same parameters and buffers (whatever is applied to the model before sharding, e.g. an adapter,
    is applied inside ``build``). ``device`` is where the shards live (the rank's GPU, or CPU under CPU offload).
    Every rank must call it (collectives over the default process group).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    policy = build(True)
    shard(policy)  # on meta: DTensor parameters of the right shard shapes, still without memory
    policy.to_empty(device=device)  # memory for this rank's shards (and whole buffers), uninitialised
    full = build(False) if dist.get_rank() == 0 else None
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    with torch.no_grad():
        set_model_state_dict(policy, full.state_dict() if full is not None else {}, options=options)
        broadcast_buffers(policy, full)
    return policy


def broadcast_buffers(policy: torch.nn.Module, source: torch.nn.Module | None) -> None:
    """Every buffer of ``policy`` set to ``source``'s (given on rank 0 only): the state dict leaves out non-persistent
    buffers such as the rotary ``inv_freq``, which ``to_empty`` left uninitialised."""
    import torch.distributed as dist

    # NCCL sends only GPU tensors; the buffers may sit in CPU memory (CPU offload) until Lightning moves the module
    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for name, buffer in policy.named_buffers():
        sent = source.get_buffer(name).to(wire or buffer.device, buffer.dtype) if source is not None else None
        if sent is None:
            sent = torch.empty_like(buffer, device=wire or buffer.device)
        dist.broadcast(sent, src=0)
        buffer.copy_(sent)
