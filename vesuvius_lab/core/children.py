"""Child processes end with their parent: no worker, rank or job is left running when the command dies.

Every process the tool starts calls :func:`adopt` as it starts. On Linux that asks the kernel for a
signal when the parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks that the parent is still the
one expected, since it may have died before the request; elsewhere a thread polls ``os.getppid()``.
A child that dies this way takes its own children with it, because they adopted it in turn.

The kernel's "parent" is the *thread* that created the child, not its process: a child created by a
thread that ends before its process does would be signalled too early. So a child is told whether
the main thread created it (the main thread lives as long as the process); one created by another
thread, or by a thread it cannot know, is watched by polling instead.

How each kind of child adopts its parent:

- every ``multiprocessing`` child (pools, ``ProcessPoolExecutor``, DataLoader workers,
  ``torch.multiprocessing`` ranks), including the pools that libraries such as nnU-Net start: as it
  starts, without being asked. A fork child inherits this module and runs it from multiprocessing's
  after-fork hook; a spawned child, when it imports this module as it sets up, which it does when its
  target or its parent's main module imports ``vesuvius_lab`` (the ``vlab`` command's does). Such
  children ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and when to stop is the
  command's decision (:mod:`~vesuvius_lab.core.interrupts`);
- :func:`pool_options` (a ``ProcessPoolExecutor``'s initializer), :func:`loader_worker_init` (a
  DataLoader's ``worker_init_fn``, chained with the loader's own) and :func:`adopted` (the target of a
  spawned process, e.g. a DDP rank) also tell the child which thread created it;
- a Python program started with ``subprocess.Popen`` gets :func:`environment` and calls
  :func:`adopt_from_environment` first thing; another program gets :func:`preexec`.

The multiprocessing resource tracker needs nothing: it exits once every process holding its pipe has.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

#: How often a watching thread looks whether the parent is still there.
POLL_S = 0.5
#: How long a child asked to stop gracefully (SIGTERM: save, then stop) has before it is killed.
GRACE_S = 10.0
#: Set for a Python program started with Popen: ``<parent pid>:main`` or ``<parent pid>:thread``.
PARENT_VARIABLE = "VLAB_PARENT"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Parent:
    """The process a child ends with, and whether its main thread created the child (None: unknown)."""

    pid: int
    main_thread: bool | None = None


def usable_cpus() -> tuple[int, ...]:
    """The cores this process (and so its children) may run on: its affinity, which SLURM, containers and
    ``vlab run --jobs`` narrow."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def this_process() -> Parent:
    """This process and thread, as the parent of a child it creates now."""
    return Parent(os.getpid(), threading.current_thread() is threading.main_thread())


# --------------------------------------------------------------------------- in the child


@dataclass
class _Adoption:
    pid: int  # this process (a fork child inherits its parent's record: compare)
    parent: int
    signum: int
    grace_s: float
    signalled: bool = False  # signum is on its way: the kernel sends it, or it was sent already
    watching: bool = False


_adoption: _Adoption | None = None


def adopt(parent: Parent, *, signum: int = signal.SIGKILL, grace_s: float = GRACE_S,
          ignore_interrupt: bool = False) -> None:
    """In a child, first thing: end this process with ``signum`` when ``parent`` dies; when ``signum`` is
    one the child may handle (SIGTERM: save and stop), SIGKILL follows ``grace_s`` seconds later.
    ``ignore_interrupt``: leave SIGINT to the parent. Calling it again only adds what is newly known."""
    global _adoption
    if parent.pid == os.getpid():
        return  # called in the creator itself (e.g. a DataLoader without workers)
    if ignore_interrupt and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    record = _adoption
    if record is None or record.pid != os.getpid() or record.parent != parent.pid:
        record = _adoption = _Adoption(os.getpid(), parent.pid, signum, grace_s)
    else:
        record.signum, record.grace_s = signum, grace_s
    if parent.main_thread and _kernel_death_signal(signum):
        record.signalled = True
    if os.getppid() != parent.pid:  # it died before the request took effect
        os.kill(os.getpid(), signum)
        record.signalled = True
    if not record.watching and (not record.signalled or signum != signal.SIGKILL):
        record.watching = True
        threading.Thread(target=_watch, args=(record,), name="vlab-parent-watch", daemon=True).start()


def adopt_from_environment(*, signum: int = signal.SIGKILL, grace_s: float = GRACE_S) -> None:
    """:func:`adopt` the parent named by :data:`PARENT_VARIABLE` (removed, so this process's own
    children do not inherit it), or the current parent, of unknown thread, when it is not set."""
    text = os.environ.pop(PARENT_VARIABLE, "")
    pid, _, thread = text.partition(":")
    parent = Parent(int(pid), thread == "main") if pid.isdigit() else Parent(os.getppid(), None)
    adopt(parent, signum=signum, grace_s=grace_s)


def _watch(record: _Adoption) -> None:
    """The parent is gone: ``signum`` (unless it is on its way already), then SIGKILL after the grace time."""
    while os.getppid() == record.parent:
        time.sleep(POLL_S)
    if record.signum != signal.SIGKILL:
        if not record.signalled:
            os.kill(os.getpid(), record.signum)
        time.sleep(record.grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _kernel_death_signal(signum: int) -> bool:
    """Ask Linux for ``signum`` when the creating thread of this process ends; False where it cannot."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


# --------------------------------------------------------------------------- in the parent


def pool_options() -> dict[str, Any]:
    """Keyword arguments of a ``ProcessPoolExecutor`` (or a multiprocessing ``Pool``) created and used
    by this thread: its workers end with this process and leave Ctrl-C to it."""
    return {"initializer": _pool_worker_start, "initargs": (this_process(),)}


def _pool_worker_start(parent: Parent) -> None:
    adopt(parent, ignore_interrupt=True)


@contextmanager
def process_pool(workers: int, context=None) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of :func:`pool_options`. Leaving the block normally waits for the work;
    leaving it by an exception (a stop, an error) ends the pool at once (:func:`end_pool`)."""
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=context, **pool_options())
    try:
        yield pool
    except BaseException:
        end_pool(pool)
        raise
    pool.shutdown()


def end_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: queued work is dropped and the workers are killed, not waited for (a pool that
    shuts down normally runs everything still queued first)."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # gone once it is shut down
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(timeout=5)


def loader_worker_init(worker_init_fn: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A DataLoader's ``worker_init_fn`` (the loader is iterated by this thread): adopt this process,
    then run ``worker_init_fn`` if the loader has one of its own."""
    return functools.partial(_loader_worker_start, this_process(), worker_init_fn)


def _loader_worker_start(parent: Parent, worker_init_fn: Callable[[int], None] | None, worker_id: int) -> None:
    adopt(parent, ignore_interrupt=True)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def adopted(target: Callable[..., Any]) -> Callable[..., Any]:
    """``target`` as a spawned process started by this thread should run it: adopting this process first.
    Picklable when ``target`` is (a module-level function)."""
    return functools.partial(_run_adopted, this_process(), target)


def _run_adopted(parent: Parent, target: Callable[..., Any], *args, **kwargs) -> Any:
    adopt(parent)
    return target(*args, **kwargs)



@contextmanager
def scoped_environ(**values: str | os.PathLike | int | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables inside the block; restore them after. A child
    started inside the block (a spawned worker) inherits them."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(value)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def environment() -> dict[str, str]:
    """Environment variables for a Python program started with Popen by this thread; the program
    calls :func:`adopt_from_environment` first thing."""
    return {PARENT_VARIABLE: f"{os.getpid()}:{'main' if this_process().main_thread else 'thread'}"}


def preexec(signum: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for Popen of a program that cannot call :func:`adopt` (torchrun): ``signum`` when
    this process dies (the setting survives exec). None from a thread other than the main one."""
    parent = this_process()
    if not parent.main_thread or _prctl() is None:
        return None
    return functools.partial(_death_signal_before_exec, parent.pid, signum)


def _death_signal_before_exec(parent: int, signum: int) -> None:
    _kernel_death_signal(signum)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


# --------------------------------------------------------------------------- every multiprocessing child

_forking: Parent | None = None  # set just before a fork, so the fork child knows which thread created it


def _note_fork() -> None:
    global _forking
    _forking = this_process()


def _on_process_start(_hook: object) -> None:
    """Run by multiprocessing in every child process it forks, before the child's target."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return
    known = _forking if _forking is not None and _forking.pid == parent.pid else Parent(parent.pid, None)
    adopt(known, ignore_interrupt=True)


class _Hook:
    """multiprocessing keeps a weak reference to the object an after-fork function is registered with."""


_HOOK = _Hook()
os.register_at_fork(before=_note_fork)
multiprocessing.util.register_after_fork(_HOOK, _on_process_start)  # run in fork children only
if "--multiprocessing-fork" in getattr(sys, "orig_argv", ()):
    # A spawned multiprocessing child, importing this while it sets up (its parent's main module, or its
    # target): the process that spawned it is its parent; which thread spawned it is not known here.
    adopt(Parent(os.getppid(), None), ignore_interrupt=True)
