"""The trained policy as a Hugging Face folder (config, safetensors, tokenizer with its chat template).

At the end of fit, ``callbacks.HFExport`` writes it under the run's ``default_root_dir``. Any checkpoint, a single
``.ckpt`` file or a sharded (distributed checkpoint) folder, is exported with

    python -m sppo_lightning.export runs/demo/checkpoints/last.ckpt runs/demo/hf_model

A LoRA run's checkpoint (``model.lora``) holds the adapters only: its export is the merged model in ``out`` and the
PEFT adapter beside it (``hf_adapter`` next to an ``hf_model`` folder, else ``<out>_adapter``; ``--adapter-out``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from sppo_lightning.errors import UserInputError
from sppo_lightning.sharding import POLICY_PREFIX


def save_hf_folder(
    base: str, state_dict: dict[str, torch.Tensor], tokenizer, out: str | Path, trust_remote_code: bool = False
) -> Path:
    """Write ``state_dict`` as a ``from_pretrained``-ready folder with the architecture and config of ``base``.

    The weights go into a plain model built on the meta device (no second copy in memory), so the folder records
    the real architecture name and tied weights, never a wrapper's (FSDP renames the class it shards).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if k not in set(getattr(model, "_tied_weights_keys", None) or [])]
    if missing or unexpected:
        raise UserInputError(
            f"the checkpoint does not match {base}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    try:
        model.generation_config = GenerationConfig.from_pretrained(base)
    except OSError:  # a base folder without generation_config.json keeps the default
        pass
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(hyper_parameters, policy state dict)`` from a Lightning ``.ckpt`` file or a sharded checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"checkpoint not found: {path}")
    try:
        if path.is_dir():  # ModelParallelStrategy / FSDPStrategy: shards + meta.pt
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            meta = torch.load(path / "meta.pt", weights_only=True, map_location="cpu")
            with tempfile.TemporaryDirectory() as tmp:
                dcp_to_torch_save(path, Path(tmp) / "full.pt")
                full = torch.load(Path(tmp) / "full.pt", weights_only=True, map_location="cpu")
            weights = full["state_dict"] if "state_dict" in full else full["model"]  # FSDP2 / FSDP1 key
        else:
            meta = torch.load(path, weights_only=True, map_location="cpu")
            weights = meta["state_dict"]
    except (OSError, RuntimeError, KeyError) as e:
        raise UserInputError(f"{path}: not a readable Lightning checkpoint ({e})") from None
    policy = {k[len(POLICY_PREFIX) :]: v for k, v in weights.items() if k.startswith(POLICY_PREFIX)}
    if not policy:
        raise UserInputError(f"{path}: no policy weights in this checkpoint")
    return meta.get("hyper_parameters", {}), policy


def default_adapter_dir(out: str | Path) -> Path:
    """Where the adapter of a LoRA export goes: ``hf_adapter`` beside ``hf_model`` (as the run leaves them)."""
    out = Path(out)
    return out.with_name("hf_adapter") if out.name == "hf_model" else out.with_name(f"{out.name}_adapter")


def peft_policy(base: str, lora_settings: dict, adapters: dict[str, torch.Tensor], trust_remote_code: bool = False):
    """The base model with the checkpoint's adapters in it (a PEFT model in float32), as the run trained it."""
    from transformers import AutoModelForCausalLM

    from sppo_lightning.lora import apply_lora, as_lora

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model = apply_lora(model, as_lora(lora_settings), torch.float32)
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise UserInputError(
            f"the checkpoint's adapters do not match {base} with model.lora={lora_settings}: "
            f"missing {sorted(trainable & set(missing))[:3]}, unexpected {unexpected[:3]}"
        )
    return model


def export_checkpoint(
    ckpt: str | Path, out: str | Path, base: str | None = None, adapter_out: str | Path | None = None
) -> Path:
    from transformers import AutoTokenizer

    hparams, state_dict = load_checkpoint(ckpt)
    base = base or hparams.get("model_name_or_path")
    if not base:
        raise UserInputError(f"{ckpt}: no model_name_or_path in its hyper-parameters; pass --base")
    trust = bool(hparams.get("trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust)
    if hparams.get("lora") is not None:
        from sppo_lightning.lora import adapter_state_dict, merged_state_dict, save_adapter

        model = peft_policy(base, hparams["lora"], state_dict, trust)
        full = {k: v.detach() for k, v in model.state_dict().items()}
        save_adapter(model, adapter_state_dict(model, full), base, adapter_out or default_adapter_dir(out))
        state_dict = merged_state_dict(model, full)
    return save_hf_folder(base, state_dict, tokenizer, out, trust_remote_code=trust)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sppo_lightning.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a .ckpt file or a sharded checkpoint folder (e.g. checkpoints/last.ckpt)")
    parser.add_argument("out", help="folder to write the Hugging Face model into")
    parser.add_argument("--base", help="model the run started from (default: the checkpoint's model_name_or_path)")
    parser.add_argument(
        "--adapter-out", help="for a LoRA checkpoint: the adapter's folder (default: hf_adapter beside hf_model)"
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, args.base, args.adapter_out)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
