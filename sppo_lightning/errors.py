"""Errors caused by the user's input: reported at the CLI as one message, without a traceback."""


class UserInputError(ValueError):
    """Bad data or settings; the message names the file and row, or the config key."""


class DataError(UserInputError):
    """A prompt file that cannot be used; the message names the file and row."""


class ConfigError(UserInputError):
    """An impossible combination of settings; the message names the config keys."""
