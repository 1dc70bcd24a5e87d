"""Checkpoints a run can trust: written whole or not at all, and checked before a resume.

- Saves go to a hidden temporary file beside the target, are flushed to disk and renamed over it in one step, so a
  kill during a save leaves the previous checkpoint (and ``last.ckpt``, a link to it) intact.
- ``--ckpt_path=last`` resumes from the newest *complete* checkpoint of the run's checkpoint folder; none at all, or
  none complete, is one message and exit 2 rather than a silent new run or a ``PytorchStreamReader`` traceback.
- A resume with changed settings names each changed key, and the new values apply (the optimizer's too); a checkpoint
  of another model is refused, and so are changes the checkpoint cannot be loaded with or that would make its saved
  position mean something else (``check_resume``). Each checkpoint records what that needs and the hyper-parameters
  do not hold: the strategy, the number of processes, gradient accumulation, the prompt source (``RunRecord``).
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
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
        partial = [p.name for d in dirs if d.is_dir() for p in sorted(d.glob(f".*{PARTIAL}"))]
        left = f" (only {', '.join(partial)}, left by an interrupted save: no iteration is complete)" if partial else ""
        raise ConfigError(
            f"--ckpt_path=last: no checkpoint in {where}{left}, nothing to resume; leave out --ckpt_path to start a "
            "new run"
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


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


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


OVERRIDE = "SPPO_RESUME_CHANGED"
"""Set to 1 to resume despite a change that makes the run draw or schedule from a position that means something else
(see ``check_resume``)."""

RECORD = "sppo_run"
"""The checkpoint's entry for what the hyper-parameters do not hold and a resume compares: the strategy and the number
of processes (refused if changed), the prompt source (refused if changed where iterations draw a share of it), the
gradient accumulation (warned)."""


def run_record(trainer, datamodule) -> dict[str, Any]:
    """The trainer's layout and the prompt source, as a checkpoint stores them (``RunRecord``)."""
    record: dict[str, Any] = {
        "trainer.strategy": type(trainer.strategy).__name__,
        "trainer.world_size": trainer.world_size,
        # as configured: each iteration sets the trainer's value to its step's micro-batches (data.rows_per_step)
        "trainer.accumulate_grad_batches": getattr(datamodule, "configured_accumulate", None)
        or trainer.accumulate_grad_batches,
    }
    source = getattr(datamodule, "train_source", None)
    if source is not None:
        # its plain arguments (paths, split, limit, seed...): an object held by a custom source has no stable value
        args = {k: _plain(v) for k, v in vars(source).items() if not k.startswith("_") and _is_plain(v)}
        record["data.train"] = {"class_path": f"{type(source).__module__}.{type(source).__qualname__}", **args}
    return record


class RunRecord(Callback):
    """Writes ``run_record`` into every checkpoint, and on a resume lets the optimizer follow the config.

    Lightning restores the optimizer's parameter groups from the checkpoint, settings included: a resume with
    another ``model.learning_rate``, ``weight_decay`` or ``adam_betas`` would silently keep the saved ones. The
    values ``configure_optimizers`` set are put back after the restore (the moments and the schedule's position are
    kept), and the learning rate is recomputed at the schedule's position.
    """

    def __init__(self):
        self._configured: list[list[dict]] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RECORD] = run_record(trainer, trainer.datamodule)

    def on_fit_start(self, trainer, pl_module) -> None:  # optimizers configured, the checkpoint not yet restored
        self._configured = [
            [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in trainer.optimizers
        ]

    def on_train_start(self, trainer, pl_module) -> None:  # restored
        if trainer.ckpt_path is None:
            return
        scheduled = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
        for optimizer, configured in zip(trainer.optimizers, self._configured, strict=True):
            scheduler = scheduled.get(id(optimizer))
            for group, settings in zip(optimizer.param_groups, configured, strict=True):
                for key, value in settings.items():
                    if key != "lr" or scheduler is None:
                        group[key] = value
            lambdas = getattr(scheduler, "lr_lambdas", None)
            base = [g["initial_lr"] for g in optimizer.param_groups] if scheduler is not None else None
            if base is not None and base != scheduler.base_lrs and lambdas is not None:  # LambdaLR: lr = base * f(k)
                scheduler.base_lrs = base
                for group, lr, factor in zip(optimizer.param_groups, base, lambdas, strict=True):
                    group["lr"] = lr * factor(scheduler.last_epoch)
                scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _source_changes(saved: dict, now: dict) -> list[str]:
    """``data.train.init_args.key saved -> now`` for each changed argument of the same prompt source class."""
    if saved.get("class_path") != now.get("class_path"):
        return [f"data.train {saved.get('class_path')} -> {now.get('class_path')}"]
    keys = sorted(set(saved) | set(now), key=str)
    return [f"data.train.init_args.{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _refused(saved_model: dict, model, saved_data: dict, data: dict, saved_run: dict, run: dict):
    """``(impossible, redrawn)``: the changes a resume cannot load, and those that change what the run draws or
    schedules from here on (the saved position no longer means what it meant), each as ``key saved -> now (why)``."""
    impossible, redrawn = [], []

    def change(key: str, before, after) -> str:
        return f"{key} {_plain(before)!r} -> {_plain(after)!r}"

    h = dict(model.hparams)
    if "weight_decay_on" in saved_model and saved_model["weight_decay_on"] != h["weight_decay_on"]:
        impossible.append(
            change("model.weight_decay_on", saved_model["weight_decay_on"], h["weight_decay_on"])
            + " (other optimizer parameter groups: the saved optimizer state does not fit them)"
        )
    layout = [change(k, saved_run[k], run[k]) for k in ("trainer.strategy", "trainer.world_size") if k in saved_run
              and k in run and saved_run[k] != run[k]]  # fmt: skip
    if layout:
        impossible.append(
            "; ".join(layout) + " (the checkpoint's weights and optimizer state are laid out for the processes and "
            "strategy that wrote them)"
        )
    if (
        "warmup_unit" in saved_model
        and saved_model["warmup_unit"] != h["warmup_unit"]
        and max(saved_model.get("warmup_steps", 0), h["warmup_steps"]) > 0
    ):
        redrawn.append(
            change("model.warmup_unit", saved_model["warmup_unit"], h["warmup_unit"])
            + " (the saved schedule counted the other unit: the warm-up would read its count as this one)"
        )
    per_epoch = data.get("prompts_per_epoch")
    if "prompts_per_epoch" in saved_data and saved_data["prompts_per_epoch"] != per_epoch:
        redrawn.append(
            change("data.prompts_per_epoch", saved_data["prompts_per_epoch"], per_epoch)
            + " (the prompt draw's position is iterations x prompts per iteration: it would jump, skipping or "
            "repeating prompts of the current pass)"
        )
    if per_epoch is not None and "seed" in saved_data and saved_data["seed"] != data.get("seed"):
        redrawn.append(
            change("data.seed", saved_data["seed"], data.get("seed"))
            + " (the seed orders each pass over the prompts: the rest of this pass would repeat prompts already "
            "drawn and skip others)"
        )
    if per_epoch is not None and saved_run.get("data.train", run.get("data.train")) != run.get("data.train"):
        redrawn.append(
            "; ".join(_source_changes(saved_run["data.train"], run["data.train"]))
            + " (another prompt pool: the draw would start in the middle of its first pass)"
        )
    return impossible, redrawn


def load_settings(path: Path) -> dict:
    """A checkpoint's entries other than the weights and optimizer state (a sharded folder keeps them in meta.pt)."""
    if path.is_dir():
        meta = path / "meta.pt"
        return torch.load(meta, map_location="cpu", weights_only=False) if meta.is_file() else {}
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def check_lora(ckpt_path: str, saved: dict | None, current: dict | None) -> None:
    """Refuse to resume a full fine-tuning checkpoint as a LoRA run and vice versa, or with other adapters: the saved
    weights and optimizer state are those of other parameters. Only the dropout may change (a warning, as any other
    changed setting)."""

    def shape(lora: dict | None) -> dict | None:
        return None if lora is None else {k: _plain(v) for k, v in lora.items() if k != "dropout"}

    saved, current = shape(saved), shape(current)
    if saved == current:
        return
    if saved is None or current is None:
        what = "LoRA adapters (model.lora set)" if saved is not None else "the full model (model.lora null)"
        now = "full fine-tuning" if current is None else "LoRA"
        raise ConfigError(
            f"--ckpt_path={ckpt_path} trained {what}; this run is {now}: resume with the checkpoint's model.lora, or "
            f"start a new run from its exported weights (python -m sppo_lightning.export {ckpt_path} DIR)"
        )
    changed = [f"model.lora.{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in current if saved.get(k) != current[k]]
    raise ConfigError(
        f"--ckpt_path={ckpt_path} cannot be resumed with other adapters ({'; '.join(changed)}): its adapter weights "
        "and optimizer state have the saved shapes and targets; resume with the saved model.lora"
    )


def check_resume(ckpt_path: str, model, datamodule, trainer) -> None:
    """Refuse a checkpoint of another model, or changed settings that break the resume; name every other change.

    Refused (``ConfigError``): changes the checkpoint cannot be loaded with (the optimizer's parameter groups, the
    strategy or the number of processes), and changes that make the resumed run draw prompts or schedule the
    learning rate from a position that no longer means what it meant (``prompts_per_epoch``, the draw's seed or the
    prompt pool when iterations draw a share of it, the warm-up's unit); ``SPPO_RESUME_CHANGED=1`` lets the latter
    go on anyway. Every other change (``max_epochs``, ``learning_rate``, η, logging, ...) is a warning and takes
    effect from the resumed iteration on.
    """
    path = Path(ckpt_path)
    checkpoint = load_settings(path)
    saved_model = checkpoint.get("hyper_parameters") or {}
    check_lora(ckpt_path, saved_model.get("lora"), model.hparams.get("lora"))
    expected = _expected_shapes(model.hparams)
    state = checkpoint.get("state_dict") or {}
    if expected is not None and state and model.hparams.get("lora") is None:  # a LoRA one holds the adapters only
        wrong = [k for k, shape in expected.items() if k in state and state[k].shape != shape]
        missing = [k for k in expected if k not in state]
        if wrong or len(missing) == len(expected):
            example = wrong[0] if wrong else missing[0]
            raise ConfigError(
                f"--ckpt_path={ckpt_path} holds another model than model.model_name_or_path="
                f"{model.hparams.model_name_or_path} (e.g. {example}; it was trained from "
                f"{saved_model.get('model_name_or_path')!r}): resume with that model's config"
            )
    saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
    data = dict(datamodule.hparams) if datamodule is not None else {}
    saved_run = checkpoint.get(RECORD) or {}
    run = run_record(trainer, datamodule)
    impossible, redrawn = _refused(saved_model, model, saved_data if data else {}, data, saved_run, run)
    if os.environ.get(OVERRIDE) == "1":
        redrawn = []  # named by the warning below like any other change
    if impossible or redrawn:
        export = f"python -m sppo_lightning.export {ckpt_path} DIR"
        remedy = (
            f"resume with the saved values, or start a new run from its weights ({export}, then "
            "--model.model_name_or_path=DIR without --ckpt_path)"
        )
        if redrawn and not impossible:
            remedy += f", or set {OVERRIDE}=1 to go on with the new values anyway"
        raise ConfigError(
            f"--ckpt_path={ckpt_path} cannot be resumed with these changed settings: {'; '.join(impossible + redrawn)}."
            f" To go on: {remedy}"
        )
    changes = changed_settings(saved_model, dict(model.hparams), "model")
    if data and saved_data:
        changes += changed_settings(saved_data, data, "data")
    for key in sorted(run):
        if key in saved_run and saved_run[key] != run[key]:
            if key == "data.train":
                changes += _source_changes(saved_run[key], run[key])
            else:
                changes.append(f"{key} {saved_run[key]!r} -> {run[key]!r}")
    if changes and rank_zero_only.rank == 0:
        print(
            f"warning: resuming {ckpt_path} with changed settings: {'; '.join(changes)}. The run goes on with the new "
            "values, so it is no longer an exact continuation of the interrupted one",
            file=sys.stderr,
        )
