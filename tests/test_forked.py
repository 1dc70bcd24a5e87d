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


RANK = (
    "import os, sys, time; e = os.environ; print(e['LOCAL_RANK'], e['NODE_RANK'], e['WORLD_SIZE'], e['MASTER_ADDR'], "
    "e['MASTER_PORT'], flush=True); rank = int(e['LOCAL_RANK']); "
    "time.sleep(60) if rank == 0 and sys.argv[1] == 'fail' else sys.exit(7 if sys.argv[1] == 'fail' else 0)"
)


def test_ranks_start_together_with_the_launchers_variables(tmp_path):
    proc = forked.run(["-c", RANK, "ok"], cwd=tmp_path, ranks=2)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line.split() for line in proc.stdout.splitlines())  # both ranks write to the run's streams
    assert [line[:4] for line in lines] == [["0", "0", "2", "127.0.0.1"], ["1", "0", "2", "127.0.0.1"]]
    assert lines[0][4] == lines[1][4] and int(lines[0][4]) > 0  # one MASTER_PORT for both


def test_a_failing_rank_stops_the_others_and_gives_its_exit_code(tmp_path):
    import time

    start = time.monotonic()
    proc = forked.run(["-c", RANK, "fail"], cwd=tmp_path, ranks=2)  # rank 0 would sleep 60 s: killed
    assert proc.returncode == 7 and time.monotonic() - start < 30
