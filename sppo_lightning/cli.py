"""The command line: ``LightningCLI`` over ``SPPOModule`` and ``RolloutDataModule``, with omegaconf configs.

Mistakes in the input (a missing file, a malformed row, an impossible setting, a typo'd option, a checkpoint that
cannot be resumed) end the run with one message and exit code 2; set ``SPPO_DEBUG=1`` to see the traceback. A run
stopped by SIGTERM (a preempted SLURM job, a ``kill``) exits 143 and one stopped by Ctrl-C exits 130, as a killed
process would, so schedulers do not take it for a finished run; both say how to resume.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import signal
import sys
from typing import NoReturn

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sppo_lightning import checkpoints, sharding
from sppo_lightning.data.datamodule import RolloutDataModule
from sppo_lightning.errors import ConfigError, UserInputError
from sppo_lightning.loggers import ConfigToLoggers, place_outputs
from sppo_lightning.module import SPPOModule

RESUME_HINT = "last.ckpt holds the last finished iteration; resume with --ckpt_path=last"


def debugging() -> bool:
    return bool(os.environ.get("SPPO_DEBUG"))


# ----------------------------------------------------------------------------------------------- parser errors
def _option_names(parser) -> list[str]:
    """``--key`` of every option of the parser and of its subcommands' parsers (``fit``'s ``--data.seed``...)."""
    names = [s for s in getattr(parser, "_option_string_actions", {}) if s.startswith("--")]
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in getattr(subcommands, "_name_parser_map", {}).values():
        names += [s for s in _option_names(sub) if s not in names]
    return names


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _class_path_hint(path: str) -> str:
    """Why ``path`` names no class, and the closest name that does."""
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return f"{e}"
    public = [n for n in dir(module) if not n.startswith("_")]
    if name in public:
        return f"{path} exists but does not fit here"
    close = difflib.get_close_matches(name, public, n=1, cutoff=0.6)
    return f"{module_name} has no {name}" + (f"; did you mean {module_name}.{close[0]}?" if close else "")


def short_parser_error(message: str, parser) -> str:
    """The one line that matters from jsonargparse's error, with a "did you mean" where a name was mistyped."""
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        names = _option_names(parser)
        parts = []
        for arg in unknown.group(1).split():
            option = arg.split("=", 1)[0]
            if option.startswith("--"):
                parts.append(f"unknown option {option}{_did_you_mean(option, names)}")
        if parts:
            return "; ".join(parts) + " (see --help)"
    key = re.match(r'Parser key "([^"]+)"', message)
    class_path = re.search(r"Problem with given class_path '([^']+)'", message)
    option = re.search(r"Option '([\w.]+)' is not accepted", message)
    if key and class_path and option:  # an init_args key the class does not take
        import inspect

        module_name, _, name = class_path.group(1).rpartition(".")
        try:
            params = list(inspect.signature(getattr(importlib.import_module(module_name), name)).parameters)
        except (ImportError, AttributeError, TypeError, ValueError):
            params = []
        hint = _did_you_mean(option.group(1), params)
        return f"{key.group(1)}: {class_path.group(1)} takes no init_args.{option.group(1)}{hint}"
    if key and class_path:
        return f"{key.group(1)}: cannot import {class_path.group(1)}: {_class_path_hint(class_path.group(1))}"
    not_accepted = re.search(r"(Group|Subcommand) '([\w.]+)' does not accept option '([\w.]+)'", message)
    if not_accepted:
        group, name = not_accepted.group(2), not_accepted.group(3)
        unknown = name if not_accepted.group(1) == "Subcommand" else f"{group}.{name}"
        keys = [option[2:] for option in _option_names(parser)]
        return f"unknown key {unknown}{_did_you_mean(unknown, keys)}"
    choices = re.search(r"Expected a typing.Literal\[(.*)\]. Got value: (.*)", message)
    if key and choices:
        options = re.findall(r"'([^']*)'", choices.group(1))
        got = choices.group(2).strip()
        hint = _did_you_mean(got, options)
        return f"{key.group(1)}: {got!r} is not one of {', '.join(options)}{hint}"
    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    text = " ".join(lines)
    return re.sub(r'^Parser key "([^"]+)":\s*', r"\1: ", text)


class SPPOArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose errors are one line (with a "did you mean") instead of the whole usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if debugging() or not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"error: {short_parser_error(message, parser)}", file=sys.stderr)
        sys.exit(2)


def _interpolation_error(e: Exception) -> ConfigError:
    """An interpolation omegaconf could not resolve: the key holding it, and the two forms that work."""
    key = getattr(e, "full_key", "") or ""
    key = key.split(".", 1)[1] if key.split(".", 1)[0] in ("fit", "validate", "test", "predict") else key
    target = re.search(r"Interpolation key '([^']+)'", str(e))
    target = target.group(1) if target else "trainer.max_epochs"
    relative = "." * max(len(key.split(".")), 1) + target  # up to the top: one dot per level of the key
    return ConfigError(
        f"config key {key}: {str(e).splitlines()[0]}. In a config file write ${{{target}}} (from the top of the "
        f"config) or ${{{relative}}} (relative, one dot per level up); on the command line only the relative form "
        "works"
    )


# ------------------------------------------------------------------------------------------------------- CLI
class SPPOCLI(LightningCLI):
    """LightningCLI that links the settings both halves need (``model.loss_type``, ``model.eta``) into the datamodule,
    checks a resume before it starts and turns a refused checkpoint into one message."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: the module has no test or predict step, so Lightning's ``test`` and ``predict``
        could only fail after loading the model; argparse now names the two that run. Building their parsers was
        also a fifth of every start's CLI time."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Settings both halves need, declared once: the user writes model.loss_type / model.eta, the datamodule gets
        # the same values (and --print_config shows them once, under model)
        parser.link_arguments("model.loss_type", "data.loss_type", apply_on="parse")
        parser.link_arguments("model.eta", "data.eta", apply_on="parse")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        sharding.check_parallel_layout(trainer.strategy, trainer.num_devices, trainer.num_nodes)  # before launching
        place_outputs(trainer)
        checkpoints.use_atomic_saves(trainer)
        trainer.callbacks.insert(0, checkpoints.RunRecord())  # what a resume checks, and the optimizer's settings
        return trainer

    def validate(self, **kwargs) -> None:
        """``trainer.validate``, its results printed as percentages (shares of correct answers), not 0.3149999976."""
        kwargs["verbose"] = False
        results = self.trainer.validate(**kwargs)
        if self.trainer.is_global_zero and results:
            from rich.console import Console
            from rich.table import Table

            table = Table(title="validation")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for name, value in results[0].items():
                table.add_row(name, f"{value:.1%}")
            Console().print(table)

    def _parse_ckpt_path(self) -> None:
        """Lightning's would load a ``--ckpt_path`` file while parsing and put its saved ``model`` settings over the
        config and the command line: a resume from a named file silently dropped ``--model.eta=0.5`` (while one from
        ``last`` kept it), and a truncated file died in ``torch.load``. Here the config is what runs, for ``last`` and
        a named file alike; ``before_fit`` checks the checkpoint against it (``checkpoints.check_resume``)."""

    def before_validate(self) -> None:
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = checkpoints.resolve_resume(config.get("ckpt_path"), self.trainer)

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = checkpoints.resolve_resume(config.get("ckpt_path"), self.trainer)
        if config["ckpt_path"] is not None:
            checkpoints.check_resume(config["ckpt_path"], self.model, self.datamodule, self.trainer)


def quiet() -> None:
    """Silence what a user cannot act on: Lightning's product tips, a deprecation inside Lightning, the warning that
    the checkpoint folder is not empty (a resume or a second run there is expected), transformers' bars for loading
    and writing weights (the latter erases the end-of-fit table's border in a terminal)."""
    import logging
    import warnings

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("💡 Tip")

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    from transformers.utils import logging as hf_logging

    def no_weight_bars(factory, args, kwargs):  # download bars (the hub's) stay: a user waits on those
        if kwargs.get("desc") in ("Loading weights", "Writing model shards"):
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(no_weight_bars)


class _Interrupted:
    """Remembers a Ctrl-C: Lightning handles it by exiting 1, which must become 130 here."""

    seen = False

    @classmethod
    def handler(cls, signum, frame) -> None:
        cls.seen = True
        raise KeyboardInterrupt


def make_cli(args: list[str] | None = None, run: bool = True, save_config_kwargs: dict | None = None) -> SPPOCLI:
    """``train.py``'s CLI: with ``run=False`` the model, datamodule and trainer are built from ``args`` and not run
    (what tests and ``benchmarks/`` use to build a config exactly as ``train.py`` would). ``save_config_kwargs``:
    Lightning's (``{"overwrite": True}`` lets a benchmark rerun in the same folder without a logger)."""
    return SPPOCLI(
        SPPOModule,
        RolloutDataModule,
        save_config_callback=ConfigToLoggers,
        save_config_kwargs=save_config_kwargs,
        parser_kwargs={"parser_mode": "omegaconf+"},
        parser_class=SPPOArgumentParser,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    # ${trainer.max_epochs} in a config file: keys are absolute from that file's top (under a subcommand the
    # parser's own root is `fit.`), the form omegaconf users write
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    if not debugging():
        quiet()
    previous = signal.signal(signal.SIGINT, _Interrupted.handler)
    try:
        make_cli(args)
    except UserInputError as e:
        _user_error(e)
    except SIGTERMException:  # Lightning's own exits with status 0
        print(f"stopped by SIGTERM: {RESUME_HINT}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except SystemExit as e:
        if _Interrupted.seen:  # Lightning's KeyboardInterrupt handling ends in sys.exit(1)
            print(f"stopped by Ctrl-C: {RESUME_HINT}", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        raise e
    except KeyboardInterrupt:  # before or after the trainer's own handling
        print("stopped by Ctrl-C", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as e:
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, OmegaConfBaseException):
            _user_error(_interpolation_error(e))
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def _user_error(e: UserInputError) -> NoReturn:
    if debugging():
        raise e
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
