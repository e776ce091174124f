"""The run lock: one process at a time writes a run.

Training, resuming and building an ensemble hold an advisory lock (``flock``) on ``<run>/.lock``
for as long as they write the run. A second process that wants the same run (two ``vlab run``
started at once that would resume the same killed run, a ``vlab train --resume`` of a run that is
still training) gets a message naming the holder instead of interleaving records. The operating
system releases the lock when the holder exits, however it exits (SIGKILL included), so a lock
never outlives its process. (``flock`` is local to a machine: on a network file system shared by
several machines it may not exclude a process on another machine.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.runs.folder import Run

LOCK_FILE = ".lock"


class RunBusy(UserError):
    """Another process holds the run's lock."""


class RunLock:
    """Held from :meth:`acquire` until :meth:`release` (or the end of the process)."""

    def __init__(self, run: Run):
        self.run, self.path, self._fd = run, run.path / LOCK_FILE, None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self.path)
            os.close(fd)
            raise RunBusy(f"{self.run.path}: this run is being written by {holder}. Two processes never write "
                          "one run: wait for that one to finish (or stop it), then run the command again; "
                          "`vlab leaderboard --runs` shows the run's state.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join(sys.argv)}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"process {holder['pid']} on {holder['host']} since {since} (`{holder.get('command', '?')}`)"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
