"""Stopping cleanly on Ctrl-C (SIGINT) and SIGTERM, at safe points only.

SIGTERM is what SLURM, Kubernetes, ``docker stop`` and a Kaggle session send before they kill a job,
so it is treated like Ctrl-C. While a long command runs (train, tune, predict, submit, ensemble, run,
postprocess: inside :func:`stop_signals`), a stop signal only *records* the request. The command looks
at it at its own safe points, with :func:`check`, which raises :class:`Interrupted` there: between
training steps (after saving ``last``), trials, volumes, jobs. So a signal never raises inside a
library call: an SQLite or Optuna commit, a checkpoint write, a worker's handshake. The command then
marks its run ``interrupted`` and exits with 128 + the signal (130, 143). A second signal stops at
once, unless it comes within :data:`REPEAT_WINDOW_S` of the first: that is the same request
delivered twice (Ctrl-C reaches every process of the terminal's group, and a parent passes it on).

A command that waits for child processes which stop by themselves (DDP ranks, the jobs of ``vlab run
--jobs``, torchrun) uses :func:`passed_on` instead: each signal is passed on to the children, nothing
is raised at once, and the command stops once they have. Waits wake up every :data:`POLL_S` to do so.

The handlers are installed explicitly, so the behaviour does not depend on how the process was
started: a background job inherits SIGINT as *ignored*, and Python then never raises
KeyboardInterrupt by itself. Processes forked while they are installed (multiprocessing pools,
data-loader workers) behave as if they were not: a pool that terminates its workers with SIGTERM
must see them die, not record a request in the middle of a queue.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from vesuvius_lab.core.console import err

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: A second signal within this many seconds is the same request delivered twice (Ctrl-C reaches every
#: process of the terminal's group, and a DDP parent also forwards it to its ranks), not "stop at once".
REPEAT_WINDOW_S = 2.0
#: How often a wait for child processes wakes up to pass a stop on.
POLL_S = 0.25


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; exits with 128 + signum, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class _State:
    owner: int | None = None  # the process that installed the handlers
    outer: dict = {}  # the handlers they replaced, for the processes forked from it
    signals: list[int] = []  # every stop signal received, in order
    first_at = 0.0  # when the first one came
    at = "at the next safe point"  # where the running command stops, for the message
    passing_on = False  # the children decide: never stop at once


_state = _State()


def _handle(signum: int, frame) -> None:
    if os.getpid() != _state.owner:
        _as_before(signum, frame)  # a forked child (a pool or loader worker): behave as if never installed
        return
    now = time.monotonic()
    _state.signals.append(signum)
    if len(_state.signals) == 1:
        _state.first_at = now
        if not _state.passing_on:
            again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
            err.print(f"[yellow]{signal.Signals(signum).name}:[/] stopping {_state.at} ({again} stops at once).",
                      highlight=False)
        return
    if _state.passing_on or now - _state.first_at < REPEAT_WINDOW_S:
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
def stop_signals(at: str | None = None) -> Iterator[None]:
    """Record SIGINT and SIGTERM while the block runs (main thread only); :func:`check` raises at safe
    points. ``at`` says where this command stops, e.g. "after this volume", for the message a signal
    prints. Nested blocks share the outermost one's requests."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _state.owner != os.getpid()
    if outermost:  # before the handlers, so that a signal arriving meanwhile finds them consistent
        _state.outer, _state.signals, _state.at = ({signum: signal.getsignal(signum) for signum in STOP_SIGNALS},
                                                   [], "at the next safe point")
        _state.owner = os.getpid()
    where = _state.at
    previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS}
    if at:
        _state.at = at
    try:
        yield
    finally:
        _state.at = where
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if outermost:
            _state.owner, _state.signals = None, []


def check() -> None:
    """At a safe point: raise :class:`Interrupted` if a stop signal came."""
    signum = pending()
    if signum:
        raise Interrupted(signum)


def pending() -> int | None:
    """The stop signal received while the handlers are installed, if any (the first, if several)."""
    return _state.signals[0] if _state.signals and _state.owner == os.getpid() else None


@contextmanager
def passed_on() -> Iterator[Callable[[], list[int]]]:
    """For a wait on child processes that stop by themselves: inside the block no signal stops this
    process at once; ``new()`` returns the signals not yet returned (those that came before the block
    too), for the caller to pass on. After the block, :func:`check` raises if any came."""
    with stop_signals():
        was, _state.passing_on = _state.passing_on, True
        given = 0

        def new() -> list[int]:
            nonlocal given
            if _state.owner != os.getpid():  # not the main thread: no handlers of ours, nothing recorded
                return []
            arrived = _state.signals[given:]
            given += len(arrived)
            return arrived

        try:
            yield new
        finally:
            _state.passing_on = was
