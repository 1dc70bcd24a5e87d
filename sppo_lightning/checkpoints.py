"""Checkpoints a run can trust: written whole or not at all, and checked before a resume.

- Saves go to a hidden temporary file beside the target, are flushed to disk and renamed over it in one step, so a
  kill during a save leaves the previous checkpoint (and ``last.ckpt``, a link to it) intact.
- ``--ckpt_path=last`` resumes from the newest *complete* checkpoint of the run's checkpoint folder; none at all, or
  none complete, is one message and exit 2 rather than a silent new run or a ``PytorchStreamReader`` traceback.
- A resume with changed settings names each changed key; a checkpoint of another model is refused.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from sppo_lightning.errors import ConfigError, DataError

PARTIAL = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose file appears only once it is complete (temporary file, fsync, rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{PARTIAL}")  # same folder: the rename below is atomic
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # only left when the save did not finish


def use_atomic_saves(trainer) -> None:
    """Give the trainer's strategy atomic single-file saves (sharded saves keep their own writer)."""
    strategy = trainer.strategy
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def is_complete(path: Path) -> bool:
    """A checkpoint file whose zip directory (written last) is there, or a sharded folder with its metadata."""
    if path.is_dir():
        return (path / ".metadata").is_file()
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_dirs(trainer) -> list[Path]:
    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            dirs.append(Path(callback.dirpath or Path(trainer.default_root_dir) / "checkpoints"))
    return dirs or [Path(trainer.default_root_dir) / "checkpoints"]


def resolve_resume(ckpt_path: str | None, trainer) -> str | None:
    """The checkpoint to resume from: ``last`` becomes the newest complete one; a given path must be complete."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry") or "://" in str(ckpt_path):
        return ckpt_path
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if not path.exists():
            raise ConfigError(f"--ckpt_path={ckpt_path}: no such file or folder")
        if not is_complete(path):
            raise DataError(f"--ckpt_path={ckpt_path}: the checkpoint is incomplete (its save was interrupted)")
        return ckpt_path
    dirs = checkpoint_dirs(trainer)
    found: dict[Path, float] = {}
    for folder in dirs:
        for path in folder.glob("*.ckpt") if folder.is_dir() else []:
            if path.exists():  # a dangling link counts for nothing
                found.setdefault(path.resolve(), path.resolve().stat().st_mtime)
    where = ", ".join(str(d) for d in dirs)
    if not found:
        raise ConfigError(
            f"--ckpt_path=last: no checkpoint in {where}, nothing to resume; leave out --ckpt_path to start a new run"
        )
    newest_first = sorted(found, key=found.get, reverse=True)
    broken = []
    for path in newest_first:
        if is_complete(path):
            if broken and rank_zero_only.rank == 0:
                print(
                    f"warning: skipped {', '.join(broken)}: incomplete (a save was interrupted); resuming from {path}",
                    file=sys.stderr,
                )
            return str(path)
        broken.append(str(path))
    raise DataError(
        f"--ckpt_path=last: no complete checkpoint in {where} ({', '.join(broken)}: incomplete, a save was "
        "interrupted); leave out --ckpt_path to start a new run"
    )


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def changed_settings(saved: dict, current: dict, prefix: str) -> list[str]:
    """``prefix.key saved -> current`` for every setting that differs (LightningCLI's ``_`` entries left out)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if str(key).startswith("_"):
            continue
        before, after = _plain(saved.get(key)), _plain(current.get(key))
        if before != after:
            out.append(f"{prefix}.{key} {before!r} -> {after!r}")
    return out


def _expected_shapes(hparams) -> dict[str, torch.Size] | None:
    """Parameter shapes of the configured model, built on the meta device (no weights read); None if unknown."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(
            hparams["model_name_or_path"], trust_remote_code=hparams["trust_remote_code"]
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=hparams["trust_remote_code"])
    except Exception:  # noqa: BLE001 - the check is a courtesy; loading reports real problems itself
        return None
    return {f"policy.{k}": v.shape for k, v in model.state_dict().items()}


def check_resume(ckpt_path: str, model, datamodule) -> None:
    """Refuse a checkpoint of another model; name every setting that differs from the checkpoint's."""
    path = Path(ckpt_path)
    if path.is_dir():  # a sharded checkpoint: its settings are not stored with it
        return
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    saved_model = checkpoint.get("hyper_parameters") or {}
    expected = _expected_shapes(model.hparams)
    state = checkpoint.get("state_dict") or {}
    if expected is not None and state:
        wrong = [k for k, shape in expected.items() if k in state and state[k].shape != shape]
        missing = [k for k in expected if k not in state]
        if wrong or len(missing) == len(expected):
            example = wrong[0] if wrong else missing[0]
            raise ConfigError(
                f"--ckpt_path={ckpt_path} holds another model than model.model_name_or_path="
                f"{model.hparams.model_name_or_path} (e.g. {example}; it was trained from "
                f"{saved_model.get('model_name_or_path')!r}): resume with that model's config"
            )
    changes = changed_settings(saved_model, dict(model.hparams), "model")
    if datamodule is not None and "datamodule_hyper_parameters" in checkpoint:
        changes += changed_settings(checkpoint["datamodule_hyper_parameters"], dict(datamodule.hparams), "data")
    if changes and rank_zero_only.rank == 0:
        print(
            f"warning: resuming {ckpt_path} with changed settings: {'; '.join(changes)}. The run goes on with the new "
            "values, so it is no longer an exact continuation of the interrupted one",
            file=sys.stderr,
        )
