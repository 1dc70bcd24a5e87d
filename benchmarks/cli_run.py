"""Build a run for a benchmark exactly as ``train.py fit`` would: the same CLI class, parser, links and settings.

    from cli_run import build_run
    cli = build_run(["--config", "configs/demo.yaml", "--trainer.max_epochs=2"])
    fit(cli)

A benchmark that built the module and the datamodule by hand (or through a bare ``LightningCLI``) skipped the
links ``model.eta`` -> ``data.eta`` and ``model.loss_type`` -> ``data.loss_type``, and stopped with "the module and the
datamodule disagree" once one was added. Here a setting that breaks ``train.py`` breaks the benchmark too, and the
suite's benchmark tests notice (tests/test_benchmarks.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_run(args: list[str]):
    """The ``SPPOCLI`` of ``train.py fit ARGS`` with ``run=False``: model, datamodule and trainer built, nothing run.

    Bad input ends the process as ``train.py`` does (one line, exit 2). The config is saved with ``overwrite``, so
    a benchmark run again into the same folder without a logger does not stop on its own ``config.yaml``.
    """
    from jsonargparse import set_parsing_settings

    from sppo_lightning.cli import _user_error, debugging, make_cli, quiet
    from sppo_lightning.errors import UserInputError

    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)  # as cli.main does
    if not debugging():
        quiet()
    argv, sys.argv = sys.argv, [str(REPO / "train.py")]  # the program name the parser prints, as train.py's
    try:
        return make_cli(list(args), run=False, save_config_kwargs={"overwrite": True})
    except UserInputError as e:
        _user_error(e)
    finally:
        sys.argv = argv


def fit(cli) -> None:
    """``trainer.fit`` of a built run; a refused setting found while it starts is one line and exit 2, as in
    ``train.py``."""
    from sppo_lightning.cli import _user_error
    from sppo_lightning.errors import UserInputError

    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except UserInputError as e:
        _user_error(e)
