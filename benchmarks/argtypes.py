"""argparse types the benchmarks share: a size below its minimum is refused by argparse itself, one line and exit 2.

A negative number of epochs reached Lightning as ``max_epochs=-1``, a run without end; zero rounds, prompts or
repeats ended in a traceback after the work.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """``type=at_least(1)``: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse
