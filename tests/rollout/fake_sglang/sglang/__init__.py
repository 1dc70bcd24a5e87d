"""``import sglang`` gives the stand-in (``tests/rollout/sglang_standin.py``) in processes a test starts with
``tests/rollout/fake_sglang`` first on ``PYTHONPATH`` (a training run's rank processes).

With ``SGLANG_STANDIN_DUMP`` set to a folder, each engine leaves ``<folder>/<pid>.pt`` at exit: its ServerArgs, the
names of the calls it received, and the last weights pushed to it.
"""

import atexit
import os
import sys
from pathlib import Path

import torch

from tests.rollout.sglang_source import released
from tests.rollout.sglang_standin import modules

_mods = modules(released())
for _name, _module in _mods.items():
    if _name != "sglang":
        sys.modules[_name] = _module
Engine = _mods["sglang"].Engine
__version__ = _mods["sglang"].__version__
srt = _mods["sglang.srt"]


def _dump() -> None:
    folder = os.environ.get("SGLANG_STANDIN_DUMP")
    if folder:
        for engine in Engine.instances:
            record = {"init": engine.args, "calls": [c.name for c in engine.calls], "loaded": engine.loaded}
            torch.save(record, Path(folder) / f"{os.getpid()}.pt")


atexit.register(_dump)
