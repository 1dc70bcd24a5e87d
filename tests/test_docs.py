"""The docs are tested: generated reference pages are fresh, links and anchors resolve, every logged metric is
documented, and every CPU command the README and docs/ show runs here, at a reduced size.

A command in a ```bash block is one of (its trailing comment says which):
- ``# GPU...`` (the comment starts with GPU): needs a GPU machine, not run here;
- ``# suite: tests/<file>.py``: that test runs it at a reduced size (checked: the file exists and names it);
- ``# not run: <reason>``: needs what no CI has (a wandb account, the hub);
- anything else: run below, in a scratch folder, with the sizes cut by ``SMALL`` (and placeholders filled in).
``pip install -e ".[dev]"`` and ``pytest`` are what ``.ci/run`` itself runs.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests import forked

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "incoming" not in p.parts)]
RUN_BY_CI = {'pip install -e ".[dev]"', "pytest"}
# Sizes cut for the suite: one iteration of 8 prompts, a 16-prompt validation. Appended to every train.py command.
SMALL = [
    "--trainer.max_epochs=1",
    "--data.prompts_per_epoch=8",
    "--data.val.init_args.num_prompts=16",
    "--data.val_batch_size=16",
    "--trainer.enable_progress_bar=false",
]
# What a command names that the suite swaps: a placeholder path for a fixture, a longer resume for a short one.
PLACEHOLDERS = {
    "path/to/MATH": str(REPO / "tests" / "fixtures" / "math"),
    "--trainer.max_epochs=25": "--trainer.max_epochs=2",
}


def _blocks(page: Path) -> list[list[tuple[str, str]]]:
    """Each ```bash block of a page as its commands, ``(command, trailing comment)``, continuation lines joined."""
    blocks = []
    for body in re.findall(r"^ *```(?:bash|sh)\n(.*?)^ *```", page.read_text(), re.S | re.M):
        commands, pending = [], ""
        for line in body.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = pending + line
            pending = ""
            command, _, comment = line.partition("  #")
            commands.append((" ".join(command.split()), comment.strip()))
        blocks.append(commands)
    return blocks


def _kind(command: str, comment: str) -> str:
    if command in RUN_BY_CI:
        return "ci"
    if comment.startswith("GPU"):
        return "gpu"
    if comment.startswith("suite:"):
        return "suite"
    if comment.startswith("not run:"):
        return "not run"
    return "cpu"


def _cpu_commands() -> list[tuple[str, str]]:
    """Every command to run here, as (page, command), in the order a reader meets them (the README, then the pages);
    a command shown twice runs once."""
    seen, out = set(), []
    for page in PAGES:
        for block in _blocks(page):
            for command, comment in block:
                if _kind(command, comment) == "cpu" and command not in seen:
                    seen.add(command)
                    out.append((str(page.relative_to(REPO)), command))
    return out


def _reduced(command: str) -> str:
    """The command at the suite's size: SMALL after a train.py command's own arguments, placeholders filled in."""
    for shown, real in PLACEHOLDERS.items():
        command = command.replace(shown, real)
    if " train.py " in f" {command} ":
        head, redirect, tail = command.partition(" > ")
        small = [s for s in SMALL if s.split("=")[0] not in head]  # a size the command sets itself is kept
        command = f"{head} {shlex.join(small)}{redirect}{tail}"
    return command


def _run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """A documented command as the shell runs it; ``python ARGS [> FILE]`` as a fork of the suite's preloaded
    interpreter (tests/forked.py), which runs the same ``python ARGS`` without paying its imports again."""
    words = shlex.split(command)
    operators = [w for w in words if w in ("|", "||", "&&", ";", "<", ">>", "2>", "&")]
    if words[0] == "python" and not operators and words.count(">") <= 1 and (">" not in words or words[-2] == ">"):
        argv, out = (words[1:-2], cwd / words[-1]) if ">" in words else (words[1:], None)
        return forked.run(argv, cwd=cwd, env=env, stdout=out)
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_command_is_classified_and_the_suite_ones_exist():
    """Every command is run here, named as run by a test (which exists and names it), or marked GPU / not run."""
    problems = []
    for page in PAGES:
        for block in _blocks(page):
            for command, comment in block:
                if _kind(command, comment) != "suite":
                    continue
                test_file = REPO / comment.removeprefix("suite:").strip().split()[0].rstrip(".,;")
                script = next((w for w in command.split() if w.endswith(".py") or "." in w and "/" not in w), "")
                if not test_file.exists():
                    problems.append(f"{page.name}: {command!r} names {test_file.name}, which does not exist")
                elif test_file != REPO / script and Path(script).name not in test_file.read_text():
                    problems.append(f"{page.name}: {test_file.name} does not run {script}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_cpu_commands_run(tmp_path):
    """Every CPU command of the docs runs, as shown (sizes cut), in order, in one scratch folder that sees the
    repository (so a page's resume finds the run an earlier page made, as for a reader who follows them). Every
    metrics.csv they leave has only documented columns, the win rate of the judge's run among them."""
    import csv

    for name in ("train.py", "configs", "sppo_lightning", "callbacks", "benchmarks", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    for page, command in _cpu_commands():
        run = _reduced(command)
        result = _run(run, tmp_path, env)
        assert result.returncode == 0, f"{page}: {run}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    documented, columns = _documented(), set()
    for path in tmp_path.glob("runs/**/metrics.csv"):
        with open(path) as f:
            columns |= {c for c in next(csv.reader(f)) if c not in ("epoch", "step")}
    assert "val/win_rate" in columns
    missing = sorted(c for c in columns if not _is_documented(c, documented))
    assert not missing, f"in a run's metrics.csv but not in docs/reading-a-run.md's table: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\(.*?\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, counts, fence = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and re.match(r"#{1,6} ", line):
            slug = _slug(line.lstrip("#"))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_links_and_anchors_resolve():
    """Every relative link of the README and docs/ points at a file that exists, and its #anchor at a heading."""
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_settings_reference_is_fresh():
    """docs/reference/settings.md is what docs/generate.py writes from the code today."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.main(["--check"]) == 0, "docs/reference/settings.md is stale: run python docs/generate.py"


def _logged_names(bare_heads: bool = False) -> set[str]:
    """The metric names written in the code: string constants that look like ``train/...``, ``val/...``,
    ``rollout/...``, ``time/...``, and f-strings' fixed heads (``val/accuracy/`` + a level), as ``head*``. A bare
    ``val/{key}`` says nothing by itself: its keys are checked on a real run's metrics.csv."""
    names = set()
    for path in [*(REPO / "sppo_lightning").rglob("*.py"), *(REPO / "callbacks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                head = str(node.values[0].value)
                if re.fullmatch(r"(train|val|rollout|time)/[\w@/]" + ("*" if bare_heads else "+"), head):
                    names.add(head + "*")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"(train|val|rollout|time)/[\w@/]+", node.value):
                    names.add(node.value)
    return names


def _documented() -> list[str]:
    """The first column of the metrics table in docs/reading-a-run.md (``<n>`` marks a variable part)."""
    text = (REPO / "docs" / "reading-a-run.md").read_text()
    cells = re.findall(r"^\| (`(?:train|val|rollout|time)/.*?) \|", text, re.M)
    return [name for cell in cells for name in re.findall(r"`([^`]+)`", cell)]


def _is_documented(name: str, documented: list[str]) -> bool:
    """``name`` matches a documented entry (``<...>`` in an entry matches one path segment); ``head*`` matches
    an entry that starts with the head."""
    if name.endswith("*"):
        return any(doc.startswith(name[:-1]) for doc in documented)
    return any(re.fullmatch(re.sub(r"<[^>]+>", "[^/]+", re.escape(doc)), name) for doc in documented)


def test_every_logged_metric_is_documented():
    documented = _documented()
    assert documented, "docs/reading-a-run.md has no metrics table"
    missing = sorted(n for n in _logged_names() if not _is_documented(n, documented))
    assert not missing, f"logged but not in docs/reading-a-run.md's table: {missing}"


def test_documented_metrics_exist():
    """No stale rows: every documented metric is written somewhere in the code, or falls under a key the code
    makes (``val/{key}``; those are checked on a real run by the test below)."""
    logged = _logged_names(bare_heads=True)
    stale = [
        doc for doc in _documented()
        if "<" not in doc and doc not in logged and not any(doc.startswith(n[:-1]) for n in logged if n.endswith("*"))
    ]  # fmt: skip
    assert not stale, f"documented in docs/reading-a-run.md but logged nowhere: {stale}"
