"""Every kind of bad input through the real CLI: one message naming the file and row or the config key, exit code 2,
no traceback (``SPPO_DEBUG=1`` would show it)."""

import pytest

from tests.test_cli import DEMO, REPO, run

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
    "not UTF-8": ("train.jsonl", b'{"prompt": "caf\xe9?", "ground_truth": "2"}\n', [], ":1: not UTF-8 text"),
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
    if case not in ("corrupt parquet", "overlong prompt, error mode"):
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


def test_a_subcommand_without_a_step_is_refused_naming_the_two_that_run():
    """The module has no test or predict step: ``train.py test`` stops at the command line, before any loading."""
    proc = run("test", "--config", DEMO, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid choice: 'test' (choose from 'fit', 'validate')" in proc.stderr


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


TOY = str(REPO / "sppo_lightning" / "toy" / "model")


def one_line_error(proc) -> str:
    """The run ended with exit 2 and exactly one ``error:`` line, no traceback and no usage; that line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return line


def test_typo_in_a_suffixless_path_is_file_not_found_not_a_hub_lookup(tmp_path):
    (tmp_path / "data").mkdir()  # the folder exists, the file name is mistyped
    proc = run(
        "fit", "--config", DEMO, f"--model.model_name_or_path={TOY}", "--data.train=sppo_lightning.data.PromptFiles",
        "--data.train.init_args.paths=data/mth", f"--trainer.default_root_dir={tmp_path / 'run'}", cwd=tmp_path,
        check=False,
    )  # fmt: skip
    assert one_line_error(proc) == "error: data/mth: file not found"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--data.sample_per_prompt=3"],
            "unknown option --data.sample_per_prompt; did you mean --data.samples_per_prompt?",
        ),
        (["--data.engine=sppo_lightning.rollout.HFEngin"], "did you mean sppo_lightning.rollout.HFEngine?"),
        (["--data.train.init_args.splt=val"], "AdditionPrompts takes no init_args.splt; did you mean split?"),
        (
            ["--model.loss_type=spo"],
            "model.loss_type: 'spo' is not one of sppo, sppo_pair, sppo_softmean, dpo, ipo, inpo, dno; "
            "did you mean sppo?",
        ),
    ],
    ids=["option", "class_path", "init_arg", "choice"],
)
def test_typos_get_one_line_with_did_you_mean(tmp_path, args, expected):
    proc = run("fit", "--config", DEMO, *args, f"--trainer.default_root_dir={tmp_path}", check=False)
    assert expected in one_line_error(proc)


def test_typo_in_a_config_file_key(tmp_path):
    (tmp_path / "typo.yaml").write_text("data:\n  sample_per_prompt: 3\n")
    proc = run("fit", "--config", DEMO, "--config", str(tmp_path / "typo.yaml"), "--print_config", check=False)
    assert one_line_error(proc) == "error: unknown key data.sample_per_prompt; did you mean data.samples_per_prompt?"


def test_absolute_interpolation_works_in_a_config_file_and_is_explained_on_the_command_line(tmp_path):
    """``${trainer.max_epochs}``, the form omegaconf users write, is rooted at the config file's top under ``fit``."""
    import yaml

    (tmp_path / "mine.yaml").write_text(
        "trainer:\n  max_epochs: 3\ndata:\n  prompts_per_epoch: ${trainer.max_epochs}\n"
    )
    printed = yaml.safe_load(
        run("fit", "--config", DEMO, "--config", str(tmp_path / "mine.yaml"), "--print_config").stdout
    )
    assert printed["data"]["prompts_per_epoch"] == 3
    proc = run("fit", "--config", DEMO, "--data.prompts_per_epoch=${trainer.max_epochs}", "--print_config", check=False)
    line = one_line_error(proc)
    assert "config key data.prompts_per_epoch" in line and "${..trainer.max_epochs}" in line


@pytest.mark.parametrize("problem", ["missing folder", "empty folder", "no chat template", "no eos"])
def test_model_folders_that_cannot_serve_as_a_policy(tmp_path, toy_model_dir, problem):
    import json
    import shutil

    folder = tmp_path / "model"
    if problem != "missing folder":
        folder.mkdir()
    if problem in ("no chat template", "no eos"):
        shutil.copytree(toy_model_dir, folder, dirs_exist_ok=True)
    if problem == "no chat template":
        (folder / "chat_template.jinja").unlink()
    if problem == "no eos":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["eos_token"] = None
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    root = f"--trainer.default_root_dir={tmp_path}"
    proc = run("fit", "--config", DEMO, f"--model.model_name_or_path={folder}", root, check=False)
    line = one_line_error(proc)
    assert f"model.model_name_or_path={folder}: " in line
    expected = {
        "missing folder": "no such folder",
        "empty folder": "it holds: nothing",
        "no chat template": "the tokenizer has no chat template",
        "no eos": "the tokenizer has no EOS token",
    }[problem]
    assert expected in line


@pytest.mark.parametrize("problem", ["no datasets package", "no network"])
def test_prepare_math_from_the_hub_without_datasets_or_network_says_use_source(tmp_path, problem):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if problem == "no datasets package":  # a `datasets` that cannot be imported, as when the extra is not installed
        (tmp_path / "fake" / "datasets").mkdir(parents=True)
        (tmp_path / "fake" / "datasets" / "__init__.py").write_text("raise ImportError('No module named datasets')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), env.get("PYTHONPATH", ""), str(REPO)])
    proc = subprocess.run(
        [sys.executable, "-m", "sppo_lightning.data.prepare_math", "--out", str(tmp_path / "math")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    line = one_line_error(proc)
    assert "--source path/to/MATH" in line
    if problem == "no datasets package":
        assert 'pip install "sppo-lightning[datasets]"' in line


def test_a_hub_dataset_that_cannot_be_fetched_is_one_line(tmp_path):
    """A prompt source named like a hub dataset (org/name), with the hub out of reach: one line naming it."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run(
        "fit", "--config", DEMO, f"--model.model_name_or_path={TOY}", "--data.train=sppo_lightning.data.PromptFiles",
        "--data.train.init_args.paths=someorg/no-such-prompts", f"--trainer.default_root_dir={tmp_path}",
        cwd=tmp_path, check=False, env=env,
    )  # fmt: skip
    # with the datasets extra the hub is asked (and is out of reach); without it (the README's install) it says so
    import importlib.util

    expected = (
        "error: someorg/no-such-prompts: not a file here, and the hub did not give it ("
        if importlib.util.find_spec("datasets") is not None
        else 'error: someorg/no-such-prompts: not a file here; reading it as a hub dataset needs `pip install "sppo'
    )
    assert one_line_error(proc).startswith(expected), proc.stderr[-2000:]


SETTINGS = {
    "samples_per_prompt=0 (was a ZeroDivisionError)": (["--data.samples_per_prompt=0"], "data.samples_per_prompt must"),
    "rows_per_step not whole groups": (["--data.rows_per_step=66"], "data.rows_per_step=66 must be a positive"),
    "accumulation contradicting rows_per_step": (
        ["--trainer.accumulate_grad_batches=2"],
        "trainer.accumulate_grad_batches=2 contradicts data.rows_per_step=64",
    ),
}


@pytest.mark.parametrize(("args", "message"), SETTINGS.values(), ids=SETTINGS.keys())
def test_bad_step_settings_are_one_line(tmp_path, args, message):
    proc = run("fit", "--config", DEMO, *args, f"--trainer.default_root_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
