"""wandb the way a run needs it: offline when there are no credentials, the resolved config uploaded, no secrets.

``sppo_lightning.loggers.WandbLogger`` is Lightning's, except that ``offline`` defaults to "no API key found"
(``WANDB_API_KEY`` or a ``wandb login`` in ~/.netrc): a run without an account still works and leaves a local run
directory to ``wandb sync`` later. ``ConfigToLoggers`` (the CLI's save-config callback) writes ``config.yaml`` as
Lightning does and hands the same resolved config to every logger, with secret-looking values masked.
"""

from __future__ import annotations

import netrc
import os
import re
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
MASK = "***"


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def mask_secrets(value: Any) -> Any:
    """A copy of a nested config with the values of secret-looking keys replaced by ``***``."""
    if isinstance(value, dict):
        return {k: MASK if SECRET_KEY.search(str(k)) else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


class WandbLogger(_WandbLogger):
    def __init__(self, *args, offline: bool | None = None, save_dir: str | None = None, **kwargs):
        """Lightning's ``WandbLogger``; ``offline`` None = offline unless wandb credentials are found; ``save_dir``
        None = the trainer's ``default_root_dir`` when the run starts (see ``CSVLogger``)."""
        offline = not has_wandb_credentials() if offline is None else offline
        super().__init__(*args, offline=offline, save_dir=save_dir if save_dir is not None else ".", **kwargs)
        self.follows_root_dir = save_dir is None and kwargs.get("dir") is None

    def use_root_dir(self, root_dir: str) -> None:
        if self.follows_root_dir and self._experiment is None:
            self._save_dir = self._wandb_init["dir"] = os.fspath(root_dir)

    def log_hyperparams(self, params) -> None:
        super().log_hyperparams(mask_secrets(dict(params) if not isinstance(params, dict) else params))


class CSVLogger(_CSVLogger):
    """Lightning's ``CSVLogger``, whose ``save_dir`` left out is the trainer's ``default_root_dir`` when the run starts.

    A config printed with ``--print_config`` then holds no output path but ``default_root_dir``'s, and rerunning it
    with another ``--trainer.default_root_dir`` keeps the whole run in that folder.
    """

    def __init__(self, save_dir: str | None = None, name: str = "logs", version: int | str | None = None, **kwargs):
        super().__init__(save_dir=save_dir if save_dir is not None else ".", name=name, version=version, **kwargs)
        self.follows_root_dir = save_dir is None

    def use_root_dir(self, root_dir: str) -> None:
        """Called by the CLI once the trainer exists; nothing has been written yet."""
        if self.follows_root_dir:
            self._root_dir = self._save_dir = os.fspath(root_dir)
            self._fs = get_filesystem(root_dir)


def place_outputs(trainer) -> None:
    """Loggers and checkpoint callbacks whose folder the config leaves out write under ``default_root_dir``:
    ``logs/`` and ``checkpoints/`` (derived when the run starts, never baked into a printed config)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for logger in trainer.loggers:
        if isinstance(logger, (CSVLogger, WandbLogger)):
            logger.use_root_dir(trainer.default_root_dir)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
            callback._fs = get_filesystem(callback.dirpath)


class ConfigToLoggers(SaveConfigCallback):
    """Also give the resolved config (what ``--print_config`` prints) to the loggers: wandb's run config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = mask_secrets(self.config.as_dict())
        config.pop("config", None)  # the paths of the config files, not settings
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
