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


def main() -> None:
    argv = sys.argv[1:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(os.environ["SPPO_FORKED_SOCKET"])
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "pgid": os.getpgrp()}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    reply = conn.recv(64).decode()
    if reply == "exec":
        python = os.environ["SPPO_FORKED_PYTHON"]
        os.execv(python, [python, *argv])
    pid = int(reply)
    for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(forwarded, lambda signum, frame: os.kill(pid, signum))
    code = int(conn.recv(64).decode())
    if code < 0:  # killed by a signal: so is this process, as the caller would see it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
