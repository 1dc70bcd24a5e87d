"""The suite's script runner (tests/forked.py) gives each run what ``python ARGS`` would: its own argv, working
folder, environment, streams and exit code, and a real ``__main__``."""

import os
import sys

from tests import forked

SHOW = "import json, os, sys; print(json.dumps([sys.argv, os.getcwd(), os.environ.get('FORKED_X')])); sys.exit(3)"


def test_a_run_has_its_own_argv_cwd_env_streams_and_exit_code(tmp_path):
    import json

    env = {**os.environ, "FORKED_X": "1"}
    proc = forked.run(["-c", SHOW, "a", "b"], cwd=tmp_path, env=env)
    assert proc.returncode == 3
    assert json.loads(proc.stdout) == [["-c", "a", "b"], str(tmp_path), "1"]
    assert "FORKED_X" not in os.environ  # the test's own process is untouched


def test_a_script_runs_as_main_and_an_uncaught_error_exits_1_with_its_traceback(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import sys\nprint(__name__, sys.argv[1:])\nprint('to stderr', file=sys.stderr)\nraise ValueError('x')\n"
    )
    proc = forked.run([str(script), "--flag"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == "__main__ ['--flag']\n"
    assert "to stderr" in proc.stderr and "ValueError: x" in proc.stderr


def test_output_to_a_file_and_a_module_run(tmp_path):
    proc = forked.run(["-m", "json.tool", "--help"], cwd=tmp_path, stdout=tmp_path / "help.txt")
    assert proc.returncode == 0 and "json.tool" in (tmp_path / "help.txt").read_text()
    assert sys.executable in proc.args
