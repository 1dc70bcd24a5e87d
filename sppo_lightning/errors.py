"""Errors caused by the user's input: reported at the CLI as one message, without a traceback."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    """Loading a model folder or hub id: transformers' refusal to run a repository's own code, and a folder that is
    missing or lacks a file, each become one message naming the setting (``key`` is the trust_remote_code key; the
    path's key is its sibling ``model_name_or_path``)."""
    path_key = f"{key.rpartition('.')[0]}.model_name_or_path"
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(
                f"{path} ships its own Python code, which runs only with {key}=true; set it only if you trust its "
                "author"
            ) from None
        if Path(path).is_dir():  # e.g. a folder without tokenizer files
            raise ConfigError(f"{path_key}={path}: {model_load_problem(path, e)}") from None
        raise
    except OSError as e:
        raise ConfigError(f"{path_key}={path}: {model_load_problem(path, e)}") from None


def model_load_problem(path: str, error: OSError) -> str:
    """What is wrong with a model path, in a few words: no such folder, a missing file, or the hub's answer."""
    local = Path(path)
    if not local.exists() and (local.is_absolute() or path.startswith(".") or path.count("/") != 1):
        return "no such folder (and not a hub id: those are 'name' or 'org/name')"
    if local.is_dir():
        files = ", ".join(sorted(p.name for p in local.iterdir())) or "nothing"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"cannot load it from this folder ({first}); it holds: {files}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"not a local folder, and the hub did not give it: {first}"


def check_tokenizer(tok, path: str, key: str = "model.model_name_or_path") -> None:
    """A policy's tokenizer must end responses (an EOS token) and turn chat messages into a prompt (a chat template)."""
    problems = []
    if tok.eos_token_id is None:
        problems.append("no EOS token (eos_token in tokenizer_config.json): generation could never stop")
    if not getattr(tok, "chat_template", None):
        problems.append("no chat template (chat_template.jinja or chat_template in tokenizer_config.json)")
    if problems:
        raise ConfigError(f"{key}={path}: the tokenizer has " + " and ".join(problems))
