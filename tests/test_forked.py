"""The suite's script runner (tests/forked.py) gives each run what ``python ARGS`` would: its own argv, working
folder, environment, streams and exit code, and a real ``__main__``."""

import os
import sys

import pytest

from tests import forked

FORKING = pytest.mark.skipif(
    bool(os.environ.get("SPPO_TESTS_NO_FORK")), reason="SPPO_TESTS_NO_FORK: scripts run in fresh interpreters"
)

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


ENDINGS = """
import atexit, sys, threading, time
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
print("buffered", end="")
sys.exit(sys.argv[1] if sys.argv[1] == "a message" else int(sys.argv[1]) if sys.argv[1] != "none" else None)
"""


@pytest.mark.parametrize(("arg", "code"), [("none", 0), ("3", 3), ("a message", 1)])
def test_a_run_ends_as_the_interpreter_ends_a_program(tmp_path, arg, code):
    """A run ends without the interpreter's teardown (``forked._end``) but as a program does: a thread that is not a
    daemon finishes first, atexit functions run, buffered output is written, ``sys.exit``'s argument is read as the
    interpreter reads it (None: 0, a message: on stderr, exit 1)."""
    proc = forked.run(["-c", ENDINGS, arg], cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (code, "bufferedthread done\natexit ran\n")
    assert proc.stderr == ("a message\n" if code == 1 else "")


def test_output_to_a_file_and_a_module_run(tmp_path):
    proc = forked.run(["-m", "json.tool", "--help"], cwd=tmp_path, stdout=tmp_path / "help.txt")
    assert proc.returncode == 0 and "json.tool" in (tmp_path / "help.txt").read_text()
    assert sys.executable in proc.args


RANK = (
    "import os, sys, time; e = os.environ; print(e['LOCAL_RANK'], e['NODE_RANK'], e['WORLD_SIZE'], e['MASTER_ADDR'], "
    "e['MASTER_PORT'], flush=True); rank = int(e['LOCAL_RANK']); "
    "time.sleep(60) if rank == 0 and sys.argv[1] == 'fail' else sys.exit(7 if sys.argv[1] == 'fail' else 0)"
)


@FORKING
def test_ranks_start_together_with_the_launchers_variables(tmp_path):
    proc = forked.run(["-c", RANK, "ok"], cwd=tmp_path, ranks=2)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line.split() for line in proc.stdout.splitlines())  # both ranks write to the run's streams
    assert [line[:4] for line in lines] == [["0", "0", "2", "127.0.0.1"], ["1", "0", "2", "127.0.0.1"]]
    assert lines[0][4] == lines[1][4] and int(lines[0][4]) > 0  # one MASTER_PORT for both


@FORKING
def test_a_failing_rank_stops_the_others_and_gives_its_exit_code(tmp_path):
    import time

    start = time.monotonic()
    proc = forked.run(["-c", RANK, "fail"], cwd=tmp_path, ranks=2)  # rank 0 would sleep 60 s: killed
    assert proc.returncode == 7 and time.monotonic() - start < 30


STARTS_PYTHON = """
import os, subprocess, sys, time
os.makedirs("lib")
open("lib/mod_x.py", "w").write("X = 7")
CHILD = 'import os, sys, mod_x; print("child", os.getcwd(), os.environ["Y"], mod_x.X, "torch" in sys.modules)'
env = {**os.environ, "Y": "y", "PYTHONPATH": os.pathsep.join(["lib", os.environ.get("PYTHONPATH", "")])}
start = time.monotonic()
code = subprocess.run([sys.executable, "-c", CHILD + "; sys.exit(5)"], env=env).returncode
print("parent", code, time.monotonic() - start < 5)
"""


@FORKING
def test_a_python_that_a_run_starts_is_forked_too_with_its_streams_env_path_and_exit_code(tmp_path):
    """A launcher's rank or a benchmark's run (``sys.executable ...`` inside a run): same streams, folder,
    environment and ``PYTHONPATH``, its exit code, and torch already imported (no interpreter start to pay)."""
    proc = forked.run(["-c", STARTS_PYTHON], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"child {tmp_path} y 7 True", "parent 5 True"]


SIGNALS_PYTHON = """
import signal, subprocess, sys, time
WAITS = 'import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); print("up", flush=True)'
WAITS += "; time.sleep(60)"
child = subprocess.Popen([sys.executable, "-c", WAITS], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
child.send_signal(signal.SIGTERM)
print(child.wait())
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
time.sleep(1)
child.kill()
print(child.wait())
"""


@FORKING
def test_signals_reach_the_forked_python_and_a_killed_one_ends_its_run(tmp_path):
    """SIGTERM is passed on to the run (its handler exits 143); SIGKILL, which cannot be passed on, ends the run
    too (the zygote sees the shim hang up), so nothing is left behind for the zygote to wait for."""
    proc = forked.run(["-c", SIGNALS_PYTHON], cwd=tmp_path, timeout=60)
    assert proc.stdout.split() == ["143", "-9"], proc.stderr
