"""This machine's devices shared out between the jobs of ``vlab run --jobs N``.

On CUDA a slot is one GPU (and an equal share of the CPU cores, for its data loading); on the CPU
a slot is one of N equal shares of the cores this process may use. A job leases as many slots as
its DDP ``nproc`` (at most all of them) and runs pinned to them: its ``CUDA_VISIBLE_DEVICES`` names
its GPUs, its CPU affinity is its cores, and its thread pools (OpenMP, MKL, torch) are as wide as
its cores, so that N jobs at once never fight over one core. On the CPU, the cores of slots that
no queued job takes are lent to the running jobs (:func:`lend_free_cores`), which widen to them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from vesuvius_lab.core.children import usable_cpus
from vesuvius_lab.core.training.cpu_share import describe_cores, move_process

#: The worker pins itself to these cores (comma-separated ids) before anything else runs.
CPUS_VARIABLE = "VLAB_CPUS"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


@dataclass(frozen=True)
class Slot:
    index: int
    cpus: tuple[int, ...]
    gpu: str | None = None  # as CUDA_VISIBLE_DEVICES names it


@dataclass(frozen=True)
class Lease:
    """The slots one job runs on."""

    slots: tuple[Slot, ...]

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(sorted({cpu for slot in self.slots for cpu in slot.cpus}))

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(slot.gpu for slot in self.slots if slot.gpu is not None)

    def environment(self) -> dict[str, str]:
        """What the job's process gets on top of this one's environment."""
        threads = str(max(1, len(self.cpus)))
        env = {CPUS_VARIABLE: ",".join(map(str, self.cpus)), **{name: threads for name in THREAD_VARIABLES}}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env

    def describe(self) -> str:
        if self.gpus:
            return "cuda " + ",".join(self.gpus)
        return "cpu " + describe_cores(self.cpus)


class Pool:
    """The free slots; :meth:`take` leases the lowest free ones."""

    def __init__(self, slots: list[Slot]):
        self.slots, self._free = list(slots), {slot.index for slot in slots}

    @property
    def size(self) -> int:
        return len(self.slots)

    def take(self, count: int) -> Lease | None:
        count = max(1, min(count, self.size))
        if len(self._free) < count:
            return None
        chosen = sorted(self._free)[:count]
        self._free -= set(chosen)
        return Lease(tuple(self.slots[i] for i in chosen))

    def give_back(self, lease: Lease) -> None:
        self._free |= {slot.index for slot in lease.slots}

    @property
    def lends_cores(self) -> bool:
        """CPU slots: the cores of free ones can be lent to running jobs (GPU slots are not shared)."""
        return all(slot.gpu is None for slot in self.slots)

    def free_cpus(self) -> tuple[int, ...]:
        return tuple(sorted({cpu for index in self._free for cpu in self.slots[index].cpus}))


def visible_gpus() -> tuple[str, ...]:
    """The CUDA devices this process sees, named as CUDA_VISIBLE_DEVICES names them for a child."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    return tuple(names[:count]) if names else tuple(str(i) for i in range(count))


def split_evenly(items: tuple[int, ...], parts: int) -> list[tuple[int, ...]]:
    """``items`` cut into ``parts`` contiguous runs whose lengths differ by at most one."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        runs.append(items[start:end])
        start = end
    return runs


def machine_pool(jobs: int, device: str, cpus: tuple[int, ...] | None = None,
                 gpus: tuple[str, ...] | None = None) -> Pool:
    """The slots of this machine for ``jobs`` jobs at once on ``device`` ("cpu" or "cuda")."""
    cpus = cpus or usable_cpus()
    if device == "cuda":
        gpus = gpus if gpus is not None else visible_gpus()
        shares = split_evenly(cpus, len(gpus)) if len(cpus) >= len(gpus) else [cpus] * len(gpus)
        return Pool([Slot(i, shares[i], gpu) for i, gpu in enumerate(gpus)])
    return Pool([Slot(i, share) for i, share in enumerate(split_evenly(cpus, jobs))])


def pin_from_environment() -> None:
    """In a job's process: run on the cores its launcher chose (``VLAB_CPUS``), if any.

    torch is loaded first, on purpose: GNU OpenMP counts the cores it may use when it is loaded,
    and a process that starts on fewer cores than threads it later runs (a job that takes up cores
    another job freed: :mod:`vesuvius_lab.core.training.cpu_share`) makes its threads sleep instead of
    spinning between parallel regions, which halves the speed of a training step. Its threads
    are as many as ``OMP_NUM_THREADS`` says either way."""
    importlib.import_module("torch")  # before the affinity: see above

    cpus = tuple(sorted({int(part) for part in os.environ.get(CPUS_VARIABLE, "").split(",") if part.strip().isdigit()}))
    if cpus:
        move_process(cpus)


def lend_free_cores(pool: Pool, running: list[Lease]) -> list[tuple[int, ...]]:
    """The cores each running CPU job should use now: its lease's, plus an even share of the cores of
    the slots that are free (when a queued job takes a slot, its cores go back to the pool)."""
    if not running or not pool.lends_cores:
        return [lease.cpus for lease in running]
    spare = split_evenly(pool.free_cpus(), len(running)) if pool.free_cpus() else []
    return [tuple(sorted({*lease.cpus, *(spare[i] if i < len(spare) else ())})) for i, lease in enumerate(running)]
