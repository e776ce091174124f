"""Stopping cleanly on Ctrl-C (SIGINT) and SIGTERM.

SIGTERM is what SLURM, Kubernetes, ``docker stop`` and a Kaggle session send before they kill a
job, so it is treated like Ctrl-C: the run saves and exits, marked ``interrupted`` and resumable.
While the trainer loop runs, a signal is *deferred*: the loop finishes the optimizer step in
progress, saves ``last`` with the exact optimizer, scheduler, RNG and position in the epoch, and
then stops (a second Ctrl-C stops at once). Elsewhere (validation of a backend, ensembles, the
queue of ``vlab run``) the signal raises :class:`Interrupted` right away; every record is written
atomically, so nothing half-written is left.

The handlers are installed explicitly, so the behaviour does not depend on how the process was
started: a background job inherits SIGINT as *ignored*, and Python then never raises
KeyboardInterrupt by itself. Processes forked while they are installed (multiprocessing pools,
e.g. nnU-Net's preprocessing, and data-loader workers) behave as if they were not: a pool that
terminates its workers with SIGTERM must see them die, not raise in the middle of a queue.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from vesuvius_lab.core.console import err

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; exits with 128 + signum, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


#: A second signal within this many seconds is the same request delivered twice (Ctrl-C reaches every
#: process of the terminal's group, and a DDP parent also forwards it to its ranks), not "stop at once".
REPEAT_WINDOW_S = 2.0


class _State:
    deferring = False  # inside the trainer loop: stop at the next step boundary
    pending: int | None = None  # the signal received while deferring
    received_at = 0.0
    owner: int | None = None  # the process that installed the handlers
    outer: dict = {}  # the handlers they replaced, for the processes forked from it


_state = _State()


def _handle(signum: int, frame) -> None:
    if os.getpid() != _state.owner:
        _as_before(signum, frame)  # a forked child (a pool or loader worker): behave as if never installed
        return
    if _state.deferring:
        if _state.pending is None:
            _state.pending, _state.received_at = signum, time.monotonic()
            err.print(f"[yellow]{signal.Signals(signum).name}:[/] saving at the end of this training step, then "
                      "stopping (Ctrl-C again stops at once).", highlight=False)
            return
        if time.monotonic() - _state.received_at < REPEAT_WINDOW_S:
            return
    raise Interrupted(signum)


def _forget_in_child() -> None:
    """Right after a fork: give the child the handlers it would have had, so that the kernel's default
    (terminate) applies to it again before any of its code runs."""
    if _state.owner is not None and threading.current_thread() is threading.main_thread():
        for signum, handler in _state.outer.items():
            signal.signal(signum, handler)


os.register_at_fork(after_in_child=_forget_in_child)


def _as_before(signum: int, frame) -> None:
    """What the process did before the handlers were installed: terminate (a pool terminating its
    workers relies on it), ignore, or call the earlier handler (e.g. Python's KeyboardInterrupt)."""
    before = _state.outer.get(signum, signal.SIG_DFL)
    if callable(before):
        before(signum, frame)
    elif before != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as described above while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS}
    outermost = _state.owner != os.getpid()
    if outermost:
        _state.owner, _state.outer = os.getpid(), dict(previous)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if outermost:
            _state.owner = None


@contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a stop signal only sets :func:`pending`; the loop calls it at step boundaries."""
    _state.deferring, _state.pending = True, None
    try:
        yield
    finally:
        _state.deferring = False


def pending() -> int | None:
    """The stop signal received inside :func:`deferred`, if any."""
    return _state.pending
