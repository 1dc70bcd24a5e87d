"""The command line: ``LightningCLI`` over ``SPPOModule`` and ``RolloutDataModule``, with omegaconf configs.

Mistakes in the input (a missing file, a malformed row, an impossible setting) end the run with one message
and exit code 2; set ``SPPO_DEBUG=1`` to see the traceback. A run stopped by SIGTERM (a preempted SLURM job, a
``kill``) exits 143, as a killed process would, so schedulers do not take it for a finished run.
"""

from __future__ import annotations

import os
import signal
import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.errors import UserInputError
from sppo_lightning.loggers import ConfigToLoggers
from sppo_lightning.module import SPPOModule


def main(args: list[str] | None = None) -> None:
    try:
        LightningCLI(
            SPPOModule,
            RolloutDataModule,
            save_config_callback=ConfigToLoggers,
            parser_kwargs={"parser_mode": "omegaconf+"},
            args=args,
        )
    except UserInputError as e:
        if os.environ.get("SPPO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:  # Lightning's own exits with status 0
        message = "stopped by SIGTERM: last.ckpt holds the last finished iteration; resume with --ckpt_path=last"
        print(message, file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
