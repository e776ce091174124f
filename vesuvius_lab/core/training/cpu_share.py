"""The cores a CPU job of ``vlab run --jobs N`` runs on, which grow when other jobs end.

The launcher starts each CPU job pinned to its share of the cores and names a file
(``VLAB_CPUS_FILE``) that holds the job's cores. When a job ends and no queued job takes its
cores, the launcher writes them into the files of the jobs still running, so that the last job
of a batch does not train on one core while the others idle; when a queued job takes them back,
it writes the smaller set again. A job follows its file at step boundaries (:class:`CoreFollower`,
at most one ``stat`` a second): every thread of its process moves to the new cores and torch's
thread pool is resized to match.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vesuvius_lab.core.children import usable_cpus

#: The file that holds a job's cores (comma-separated ids), written by the launcher.
FILE_VARIABLE = "VLAB_CPUS_FILE"
#: Seconds between two looks at the file.
CHECK_EVERY_S = 1.0


def write_cores(path: Path, cpus: tuple[int, ...]) -> None:
    """Replace the file's cores at once (a reader never sees half a list)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(",".join(map(str, cpus)) + "\n")
    tmp.replace(path)


def read_cores(path: Path) -> tuple[int, ...]:
    """The cores in the file; none when it is missing or unreadable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return ()
    return tuple(sorted({int(part) for part in text.split(",") if part.strip().isdigit()}))


def describe_cores(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def move_process(cpus: tuple[int, ...]) -> None:
    """Put every thread of this process and of its children (DataLoader workers) on ``cpus``
    (Linux; threads and processes started later inherit it)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    for tid in _threads(os.getpid()) + [t for child in _children(os.getpid()) for t in _threads(child)]:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that just ended, or a core we may not use
            pass


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid] if pid == os.getpid() else []


def _children(pid: int) -> list[int]:
    children = []
    for tid in _threads(pid):
        try:
            children += [int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return children


class CoreFollower:
    """In a job's process: :meth:`follow` applies the launcher's latest cores for this job, with
    ``len(cores) // processes`` torch threads (each DDP rank of a job follows the same file)."""

    def __init__(self, processes: int = 1):
        self.path = os.environ.get(FILE_VARIABLE) or None
        self.processes = max(1, processes)
        self.applied = usable_cpus()
        self.checked = time.monotonic()

    def follow(self) -> bool:
        """At a step boundary: move to new cores if the launcher changed them; True when it did."""
        if self.path is None or time.monotonic() - self.checked < CHECK_EVERY_S:
            return False
        self.checked = time.monotonic()
        cpus = read_cores(self.path)
        if not cpus or cpus == self.applied:
            return False
        import torch

        move_process(cpus)
        torch.set_num_threads(max(1, len(cpus) // self.processes))
        self.applied = cpus
        return True
