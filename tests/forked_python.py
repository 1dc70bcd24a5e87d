"""The ``python`` that a run forked by ``tests/forked.py`` sees as ``sys.executable``: ``python ARGS`` started from
inside a run (Lightning's launcher starting rank 1, a benchmark starting ``train.py``) becomes a fork of the same
zygote, with this process's streams, folder, environment and process group, and this process's exit code. Signals
sent to this process reach the run. Started as ``python -S -E`` (standard library only, a few milliseconds); when the
run needs other import-time settings (thread pools, hub variables), the real interpreter replaces this process.
"""

import json
import os
import signal
import socket
import sys

FORWARDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}


def main() -> None:
    argv = sys.argv[1:]
    # Held from before the run exists until the handlers that pass them on are in place: the run may install its own
    # handler and tell its caller so before this process has read the run's pid, and a signal sent then would end
    # this process by its default action (seen in CI: SIGTERM gave -15 instead of the run's own 143).
    before = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(os.environ["SPPO_FORKED_SOCKET"])
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "pgid": os.getpgrp()}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    reply = conn.recv(64).decode()
    if reply == "exec":  # no run was forked: a signal already held acts as it would on that interpreter's start
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        python = os.environ["SPPO_FORKED_PYTHON"]
        os.execv(python, [python, *argv])
    pid = int(reply)
    for forwarded in FORWARDED:
        signal.signal(forwarded, lambda signum, frame: os.kill(pid, signum))
    signal.pthread_sigmask(signal.SIG_SETMASK, before)  # what arrived meanwhile is passed on now
    code = int(conn.recv(64).decode())
    if code < 0:  # killed by a signal: so is this process, as the caller would see it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
