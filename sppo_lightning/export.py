"""The trained policy as a Hugging Face folder (config, safetensors, tokenizer with its chat template).

At the end of fit, ``callbacks.HFExport`` writes it under the run's ``default_root_dir``. Any checkpoint, a single
``.ckpt`` file or a sharded (distributed checkpoint) folder, is exported with

    python -m sppo_lightning.export runs/demo/checkpoints/last.ckpt runs/demo/hf_model
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


def export_checkpoint(ckpt: str | Path, out: str | Path, base: str | None = None) -> Path:
    from transformers import AutoTokenizer

    hparams, state_dict = load_checkpoint(ckpt)
    base = base or hparams.get("model_name_or_path")
    if not base:
        raise UserInputError(f"{ckpt}: no model_name_or_path in its hyper-parameters; pass --base")
    trust = bool(hparams.get("trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust)
    return save_hf_folder(base, state_dict, tokenizer, out, trust_remote_code=trust)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sppo_lightning.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a .ckpt file or a sharded checkpoint folder (e.g. checkpoints/last.ckpt)")
    parser.add_argument("out", help="folder to write the Hugging Face model into")
    parser.add_argument("--base", help="model the run started from (default: the checkpoint's model_name_or_path)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, args.base)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
