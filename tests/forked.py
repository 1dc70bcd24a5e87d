"""``python SCRIPT ARGS`` and ``python -m MODULE ARGS`` for the suite, each a fork of one process per pytest worker
that has imported the heavy packages once (torch, lightning, transformers, the project).

Every run is still its own process, with its own argv, working folder, environment, stdin (empty), captured
stdout/stderr and exit code, running the script as ``__main__`` exactly as ``python SCRIPT`` would; what it does not
pay is the ~5 s of CPU that importing torch, lightning and transformers costs every ``python train.py``, which was
a third of the suite's time. The forking process (the zygote) only imports: it never computes, so no thread pool
exists when it forks. Runs whose import-time variables (``IMPORT_TIME``: thread pools, hub settings) differ get a
zygote of their own (a run's ``PYTHONPATH`` is put on its ``sys.path`` at the fork); runs a test must signal
(SIGTERM, a kill during a save) start a fresh interpreter with ``subprocess``, and so still cover ``python train.py``
from its first import.

Inside a run, ``sys.executable`` is a shim (``tests/forked_python.py``): the ``python ...`` a run starts itself
(Lightning's launcher starting rank 1 as ``python train.py ...``, a benchmark starting ``train.py`` per row) is
forked from the same zygote too, with the caller's streams, folder, environment, ``PYTHONPATH`` and process group;
its exit code and the signals sent to it are the run's (one that needs other import-time variables gets the real
interpreter).

``ranks=N`` runs a multi-process script as N forks at once, each given the variables Lightning's launcher gives the
processes it starts (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), as torchrun or
SLURM start ranks outside the script: Lightning then starts no process of its own. Without it, rank 0 is a fork and
Lightning's launcher starts the other ranks (through the shim), the way ``python train.py fit --trainer.devices=2``
runs for a user; the tests that check that path leave ``ranks`` at 1.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRELOAD = (
    "torch",
    "lightning.pytorch.cli",
    "transformers",
    "transformers.models.qwen2.modeling_qwen2",
    "sppo_lightning.cli",
    "sppo_lightning.module",
    "sppo_lightning.data.datamodule",
    "callbacks",
    "matplotlib.pyplot",  # callbacks.LearningCurves draws at the end of every demo run
    # what a run imports on its way (the CLI's omegaconf, checkpoint saving, the toy task, the answer checker's
    # math-verify: half a second at the first non-numeric answer)
    "omegaconf",
    "torch.distributed.checkpoint",
    "PIL.Image",
    "rich.console",
    "sppo_lightning.toy",
    "math_verify",
)


def run(
    argv: list[str],
    cwd: Path | str = REPO,
    env: dict | None = None,
    timeout: float = 600,
    stdout: Path | None = None,
    ranks: int = 1,
):
    """``subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``
    as a fork of a zygote started with that environment (one per distinct ``env``, the last ``KEEP`` kept per worker);
    ``stdout``: write the run's standard output to that file instead (a shell's ``> file``); ``ranks``: start that
    many ranks of the script at once, sharing the streams (see the module's docstring). A failing rank stops the
    others, as Lightning's launcher does; the exit code is the first failing rank's."""
    env = dict(os.environ if env is None else env)
    if os.environ.get("SPPO_TESTS_NO_FORK"):  # fresh interpreters, to compare or to debug: Lightning starts the ranks
        proc = subprocess.run(
            [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        if stdout is not None:
            Path(stdout).write_text(proc.stdout)
        return proc
    if ranks > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0", WORLD_SIZE=str(ranks))
        env.pop("LOCAL_RANK", None)
    return _zygote(env).run(argv, str(cwd), env, timeout, stdout, ranks)


def _free_port() -> int:
    """A port nothing listens on now (Lightning's launcher picks its ``MASTER_PORT`` the same way)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEEP = 3
_zygotes: dict[tuple, _Zygote] = {}


IMPORT_TIME = (
    "PYTHON",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TORCH",
    "PYTORCH_",
    "TOKENIZERS_",
    "CUDA_",
    "LD_",
)
"""Prefixes of the variables a package may read when it is imported (sys.path, thread pools, hub and cache
settings, library paths): runs that differ in one of them get a zygote of their own. Every other variable (a seed
Lightning exported, a rank, a test's flag) only reaches the run's environment, at the fork, as it would in
``python ARGS``."""


def _zygote(env: dict) -> _Zygote:
    key = _import_time(env)
    if key not in _zygotes:
        while len(_zygotes) >= KEEP:
            _zygotes.pop(next(iter(_zygotes))).close()
        _zygotes[key] = _Zygote(env)
    return _zygotes[key]


class _Zygote:
    def __init__(self, env: dict):
        self.env = env
        to_child, from_parent = os.pipe()  # requests: parent writes, zygote reads
        from_child, to_parent = os.pipe()  # replies
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forked", str(to_child), str(to_parent)],
            pass_fds=(to_child, to_parent), cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env={k: v for k, v in self.env.items() if k != "PYTHONPATH"},  # each run puts its own on sys.path
        )  # fmt: skip
        os.close(to_child)
        os.close(to_parent)
        self.requests, self.replies, self.buffer = from_parent, from_child, b""
        atexit.register(self.close)

    def _line(self, timeout: float | None) -> str | None:
        while b"\n" not in self.buffer:
            if timeout is not None and not select.select([self.replies], [], [], timeout)[0]:
                return None
            chunk = os.read(self.replies, 4096)
            if not chunk:
                raise RuntimeError("the suite's zygote (tests/forked.py) exited")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def run(self, argv, cwd, env, timeout, stdout=None, ranks=1):
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(stdout or Path(tmp) / "stdout"), Path(tmp) / "stderr"
            request = {"argv": argv, "cwd": cwd, "env": env, "stdout": str(out), "stderr": str(err), "ranks": ranks}
            os.write(self.requests, (json.dumps(request) + "\n").encode())
            pid = int(self._line(None))
            status = self._line(timeout)
            if status is None:
                os.killpg(pid, signal.SIGKILL)  # the run and every process it started (its own group)
                self._line(None)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(
                [sys.executable, *argv], int(status), "" if stdout else out.read_text(errors="replace"),
                err.read_text(errors="replace"),
            )  # fmt: skip

    def close(self):
        if self.requests is not None:
            os.close(self.requests)  # the zygote's loop ends at end of file
            self.requests = None
            self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------- the zygote itself
def _serve(requests_fd: int, replies_fd: int) -> None:
    """Fork a run for each request of the worker (one at a time, on the pipe) and for each ``python`` a run starts
    (through the shim, ``forked_python.py``, on a socket; any number at once), and report each exit code. A forked
    run never returns into this frame: it ends in ``_become`` (``_end``)."""
    import importlib
    import selectors
    import shutil
    import socket

    imported_with = _import_time(os.environ)  # before the imports, which may set some (OMP, tokenizers)
    for name in PRELOAD:
        importlib.import_module(name)
    folder = tempfile.mkdtemp(prefix="sppo-zygote-")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(os.path.join(folder, "socket"))
    server.listen(16)
    shim = Path(folder) / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S -E "{REPO / "tests" / "forked_python.py"}" "$@"\n')
    shim.chmod(0o755)
    links = {"SPPO_FORKED_SOCKET": server.getsockname(), "SPPO_FORKED_PYTHON": sys.executable}
    selector = selectors.DefaultSelector()
    selector.register(requests_fd, selectors.EVENT_READ)
    selector.register(server, selectors.EVENT_READ)
    waiting: dict[int, Callable[[int], None]] = {}  # pid -> what to do with its exit code

    def close_inherited() -> None:  # in a forked run: the zygote's own ends, which are not the run's
        server.close()
        os.close(requests_fd)
        os.close(replies_fd)

    pending, open_requests = b"", True
    while open_requests or waiting:
        for key, _ in selector.select(timeout=0.05):
            if key.fileobj == requests_fd:
                chunk = os.read(requests_fd, 65536)
                pending += chunk
                if not chunk:  # the worker is gone: so are its runs
                    open_requests = False
                    selector.unregister(requests_fd)
                    for pid in waiting:
                        os.kill(pid, signal.SIGKILL)
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    request = json.loads(line)
                    pid = os.fork()
                    if pid == 0:
                        close_inherited()
                        _child(request, links, str(shim))  # ends the process
                    os.write(replies_fd, f"{pid}\n".encode())
                    waiting[pid] = lambda code: _reply(replies_fd, code)
            elif key.fileobj == server:
                conn, _ = server.accept()
                message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                request = json.loads(message)
                if _import_time(request["env"]) != imported_with:
                    conn.send(b"exec")  # other thread pools or hub settings: a fresh interpreter
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                pid = os.fork()
                if pid == 0:
                    close_inherited()
                    conn.close()
                    _shim_child(request, fds, str(shim))  # ends the process
                for fd in fds:
                    os.close(fd)
                conn.send(f"{pid}".encode())
                selector.register(conn, selectors.EVENT_READ, pid)

                def answer(code: int, conn=conn) -> None:
                    if conn in selector.get_map():
                        selector.unregister(conn)
                    try:
                        conn.send(f"{code}".encode())
                    except OSError:  # the shim is gone
                        pass
                    conn.close()

                waiting[pid] = answer
            elif key.data in waiting:  # the shim hung up before its run ended: it was killed (SIGKILL), so is the run
                os.kill(key.data, signal.SIGKILL)
                selector.unregister(key.fileobj)
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            waiting.pop(pid)(os.waitstatus_to_exitcode(status))
    server.close()
    shutil.rmtree(folder, ignore_errors=True)


def _reply(replies_fd: int, code: int) -> None:
    try:
        os.write(replies_fd, f"{code}\n".encode())
    except OSError:  # the worker is gone (its runs were killed)
        pass


def _import_time(env) -> tuple:
    """The variables a zygote's imports depend on; ``PYTHONPATH`` is not one of them: the zygote starts without it
    and each run's entries go on its ``sys.path`` (``_enter``)."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME) and k != "PYTHONPATH"))


def _enter(cwd: str, env: dict, shim: str) -> None:
    """The run's folder and environment, its ``PYTHONPATH`` on ``sys.path`` where the interpreter puts it (after the
    script's folder, index 0, which ``_become`` sets; before the standard library), and the shim as its
    ``sys.executable``: the ``python ...`` it starts (a launcher's rank, a benchmark's run) is forked too."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[1:1] = [os.path.abspath(p) for p in entries]
    sys.executable = shim


def _child(request: dict, links: dict, shim: str) -> None:
    """Become ``python ARGV`` in ``cwd`` with ``env`` (or the parent of ``ranks`` such processes); ends as the
    interpreter ends a program (``_end``)."""
    os.setpgid(0, 0)  # a timeout kills the group: the ranks, and the processes Lightning's launcher starts
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    _enter(request["cwd"], {**request["env"], **links}, shim)
    if request.get("ranks", 1) > 1:
        os._exit(_ranks(request))
    _become(request["argv"])


def _shim_child(request: dict, fds: list[int], shim: str) -> None:
    """Become the ``python ARGV`` a run started through the shim: its streams, folder, environment (its
    ``PYTHONPATH`` on ``sys.path``) and process group."""
    os.setpgid(0, request["pgid"])  # the run's group: a timeout's kill reaches it
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    _enter(request["cwd"], request["env"], shim)
    _become(request["argv"])


def _ranks(request: dict) -> int:
    """Fork one process per rank with its ``LOCAL_RANK``; wait for them all. A rank that fails gets the others
    killed (SIGKILL, as Lightning's launcher does: SIGTERM does not stop a rank waiting in a collective); returns the
    first failing rank's exit code, 0 when none failed."""
    pids = {}
    for rank in range(request["ranks"]):
        pid = os.fork()
        if pid == 0:  # ends as the interpreter ends a program (_become, _end)
            os.environ["LOCAL_RANK"] = str(rank)
            _become(request["argv"])
        pids[pid] = rank
    codes = []
    while len(codes) < len(pids):
        pid, status = os.wait()
        codes.append(os.waitstatus_to_exitcode(status))
        if codes[-1] != 0 and len(codes) < len(pids):
            for other in pids:
                if other != pid:
                    try:
                        os.kill(other, signal.SIGKILL)
                    except ProcessLookupError:  # already reaped
                        pass
    return next((code for code in codes if code != 0), 0)


def _become(argv: list[str]) -> None:
    """Run ``python ARGV`` in this process, then end it as the interpreter ends a program (``_end``)."""
    import runpy

    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[0])
            sys.argv = [argv[0], *argv[1:]]
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:  # read as the interpreter reads it: None is 0, anything but an int goes to stderr, 1
        code = e.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # the interpreter prints it and ends by the signal itself (exit status 130 in a shell)
        sys.excepthook(*sys.exc_info())
        _end(None)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _end(code or 0)


def _end(code: int | None) -> None:
    """What the interpreter does when a program ends (``Py_FinalizeEx``), short of tearing its modules down: wait for
    the threads that are not daemons, run the ``atexit`` functions (logging's flush, ``weakref.finalize``, temporary
    folders), flush the standard streams, then exit with ``code`` (None: by SIGINT, as after an unhandled
    KeyboardInterrupt). The teardown, freeing a heap that holds torch, transformers and Lightning page by page of the
    zygote's copy-on-write memory, took about 1 s per run here (a refused run: 1.15 s in all, 0.21 s without it). What
    it would also do is flush a file the run left open; the project's code writes every file in a ``with`` block."""
    import threading

    threading._shutdown()  # what Py_FinalizeEx calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its pipe gone
            pass
    if code is None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
