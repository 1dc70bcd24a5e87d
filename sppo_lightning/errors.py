"""Errors caused by the user's input: reported at the CLI as one message, without a traceback."""

from collections.abc import Iterator
from contextlib import contextmanager


class UserInputError(ValueError):
    """Bad data or settings; the message names the file and row, or the config key."""


class DataError(UserInputError):
    """A prompt file that cannot be used; the message names the file and row."""


class ConfigError(UserInputError):
    """An impossible combination of settings; the message names the config keys."""


class DivergenceError(UserInputError):
    """Training kept producing non-finite losses or gradients; the remedy is in the settings (learning rate, η)."""


@contextmanager
def refusing_remote_code(path: str, key: str) -> Iterator[None]:
    """Turn transformers' refusal to run a repository's own code into one message naming the setting."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(
            f"{path} ships its own Python code, which runs only with {key}=true; set it only if you trust its author"
        ) from None
