"""Every kind of bad input through the real CLI: one message naming the file and row or the config key, exit code 2,
no traceback (``SPPO_DEBUG=1`` would show it)."""

import pytest

from tests.test_cli import DEMO, run

GOOD = '{"prompt": "What is 1+1?", "ground_truth": "2"}\n'


def write(tmp_path, name, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CASES = {
    "malformed jsonl line": ("train.jsonl", GOOD + '{"prompt": "What is 2+2?"\n', [], ":2: not valid JSON"),
    "missing ground truth": ("train.jsonl", GOOD + '{"prompt": "What is 2+2?"}\n', [], ":2: missing or empty ground"),
    "empty prompt": ("train.jsonl", '{"prompt": "   ", "ground_truth": "2"}\n', [], ":1: the prompt is empty"),
    "corrupt parquet": ("train.parquet", b"PAR1 not really", [], "not a readable parquet file"),
    "overlong prompt, error mode": (
        "train.jsonl", GOOD, ["--data.max_prompt_length=5", "--data.overlong_prompts=error"],
        "> data.max_prompt_length=5",
    ),
    "nothing left after filtering": (
        "train.jsonl", GOOD, ["--data.max_prompt_length=5"],
        "no prompt left after filtering by data.max_prompt_length=5",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_prompt_files(tmp_path, case):
    name, content, overrides, message = CASES[case]
    path = write(tmp_path, name, content)
    proc = run(
        "fit", "--config", DEMO, "--data.train=sppo_lightning.data.PromptFiles", f"--data.train.init_args.paths={path}",
        *overrides, f"--trainer.default_root_dir={tmp_path / 'run'}", check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if case not in ("corrupt parquet",) and "filtering" not in message and "max_prompt" not in message:
        assert str(path) in proc.stderr  # names the file


def test_missing_file(tmp_path):
    proc = run(
        "fit", "--config", DEMO, "--data.train=sppo_lightning.data.PromptFiles",
        f"--data.train.init_args.paths={tmp_path / 'nope.jsonl'}", f"--trainer.default_root_dir={tmp_path}",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and str(tmp_path / "nope.jsonl") in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_loss_type_names_the_key_and_choices(tmp_path):
    proc = run("fit", "--config", DEMO, "--model.loss_type=ppo", f"--trainer.default_root_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "loss_type" in proc.stderr and "sppo_softmean" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_remote_code_is_refused_unless_trusted(tmp_path, toy_model_dir):
    """A model folder that ships its own code: loading it would run that code, so it is refused by default."""
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(toy_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    config["model_type"] = "sppo_custom"  # a type transformers does not know: only the folder's code can load it
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code_ran"
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import Qwen2Config\n\nclass CustomConfig(Qwen2Config):\n    model_type = 'sppo_custom'\n"
    )
    proc = run(
        "fit", "--config", DEMO, f"--model.model_name_or_path={folder}", f"--trainer.default_root_dir={tmp_path}",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "runs only with model.trust_remote_code=true" in proc.stderr
    assert not marker.exists()  # the repository's code never ran
