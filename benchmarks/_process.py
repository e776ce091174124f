"""Commands the benchmarks time in processes of their own: wall seconds and the kernel's peak resident memory."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def vlab(*args: str) -> list[str]:
    """The `vlab ARGS` command line, on the CPU."""
    return [sys.executable, "-m", "vesuvius_lab", "--device", "cpu", *args]


def measured(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak resident MiB (the process, or any descendant it waited for: wait4) of a command
    that must succeed; its stderr goes to a file, so a talkative command cannot fill a pipe and stall."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}\n"
                             f"{stderr.read().decode(errors='replace')[-3000:]}")
    return seconds, usage.ru_maxrss / 1024
