"""torch.distributed on one machine (``nproc`` processes) or under ``torchrun``.

gloo on the CPU, nccl on CUDA. Only rank 0 writes files and draws progress. A rank that dies
takes the others down: ``torch.multiprocessing.spawn`` terminates the survivors, and every
collective has a timeout, so nobody waits forever.
"""

from __future__ import annotations

import functools
import os
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from vesuvius_lab.core import children, interrupts

#: How long a collective may wait for a missing rank before the others give up.
COLLECTIVE_TIMEOUT = timedelta(minutes=int(os.environ.get("VLAB_DDP_TIMEOUT_MIN", "10")))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init(rank: int, world_size: int, device: str, port: int | None = None) -> None:
    """Join the process group (a no-op for a single process)."""
    if world_size <= 1 or dist.is_initialized():
        return
    if port is not None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)


def shutdown(*, together: bool = False) -> None:
    """Leave the process group. ``together`` (a rank that ended well): first wait for every rank, since
    gloo can abort a rank that tears its group down while a peer is still busy (seen as SIGABRT)."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size); under torchrun known from its environment before the group exists."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launched_by_torchrun():
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> str:
    """nccl reduces tensors on the GPU only; gloo on the CPU."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over the ranks (same keys on every rank)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def max_across_ranks(value: int) -> int:
    """The largest of an int over the ranks (e.g. a stop signal that reached only some of them)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankFailed(RuntimeError):
    """A spawned rank exited with an error; the others were terminated."""

    def __init__(self, message: str, exit_code: int | None):
        super().__init__(message)
        self.exit_code = exit_code


def spawn(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Run ``fn(rank, nproc, port, *args)`` in ``nproc`` processes; one failing stops them all.

    The ranks end with this process (:mod:`vesuvius_lab.core.children`). SIGINT and SIGTERM sent to this
    process are passed on to the ranks, which stop together at a step boundary and exit with 128 + the
    signal; this process then raises :class:`interrupts.Interrupted`.
    """
    import torch.multiprocessing as mp

    rank_main = children.adopted(functools.partial(_recording_stops, fn))
    context = mp.start_processes(rank_main, args=(nproc, free_port(), *args), nprocs=nproc, join=False,
                                 start_method="spawn")
    with interrupts.passed_on() as new_signals:
        try:
            while not context.join(timeout=interrupts.POLL_S):
                for signum in new_signals():
                    _signal_ranks(context, signum)
        except mp.ProcessExitedException as exc:
            code = exc.exit_code or 0
            if code - 128 in interrupts.STOP_SIGNALS:
                raise interrupts.Interrupted(code - 128) from None
            if -code in interrupts.STOP_SIGNALS and interrupts.pending():  # the signal came before it listened
                raise interrupts.Interrupted(-code) from None
            raise RankFailed(f"rank {exc.error_index} exited with status {exc.exit_code}; the other ranks were "
                             "stopped", exc.exit_code) from exc


def _recording_stops(fn: Callable[..., Any], *args: Any) -> Any:
    """A rank: stop signals are recorded from its first line (the trainer checks them at step boundaries)."""
    with interrupts.stop_signals():
        return fn(*args)


def _signal_ranks(context, signum: int) -> None:
    for process in context.processes:
        if process.is_alive():
            os.kill(process.pid, signum)
