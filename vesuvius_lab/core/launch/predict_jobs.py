"""``vlab predict RUN --input VOLUME --output OUT.zarr --jobs N``: N processes on this machine share the blocks.

The parent plans the blocks and creates (or reopens) the output; then each worker, a spawned process
on its own slot (one GPU, or an equal share of the cores: :mod:`vesuvius_lab.core.launch.slots`),
opens the run and the output itself; once every worker has, they take block after block from one
queue, so a faster worker does more. Each block is recorded done by the worker that wrote it, as in one process, so the
output equals a one-process run's bit for bit. The parent shows one progress bar for every worker.

A stop signal (Ctrl-C, SIGTERM) reaches every worker, which stops after its block in flight; a
worker that dies (killed, out of memory) loses only its block in flight; a block that raises is
recorded failed with its traceback in ``OUT.zarr/.vlab/logs/``, and the other blocks go on. The
same command with ``--resume`` then predicts only what is left.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from vesuvius_lab.core import children, interrupts
from vesuvius_lab.core.inference.blocks import Block
from vesuvius_lab.core.inference.volume_predict import Prepared, VolumeRequest
from vesuvius_lab.core.launch.slots import machine_pool, pin_from_environment


@dataclass(frozen=True)
class WorkerOrder:
    """What a worker needs to open the run and the output as the parent did."""

    run: str
    device: str  # the project's setting ("auto", "cpu", "cuda"), resolved where the worker runs
    overrides: tuple[str, ...]
    request: VolumeRequest


#: Called after each block: (block, True if the model ran / False if it held no scroll / None if it failed,
#: the error or None).
OnBlock = Callable[[Block, "bool | None", "str | None"], None]


@dataclass
class SharedOutcome:
    """What went wrong: blocks that failed (name -> error), workers that died (exit codes)."""

    failed: dict[str, str] = field(default_factory=dict)
    died: list[int] = field(default_factory=list)


def block_log(prepared: Prepared, block: Block) -> Path:
    return prepared.records.root / "logs" / f"{block.name}.log"


def predict_recording_failure(prepared: Prepared, block: Block, log: Path | None = None) -> tuple[bool | None, str | None]:
    """Predict one block; an exception is recorded as the block's failure instead of ending the process:
    (predicted, None) or (None, error). Its traceback goes to ``log`` (a job array task's own log, which is
    this process's stderr) or, by default, to ``.vlab/logs/<block>.log``."""
    from vesuvius_lab.core.inference.volume_predict import predict_one

    try:
        return predict_one(prepared, block), None
    except (interrupts.Interrupted, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - recorded with its traceback; the other blocks go on
        error = f"{type(exc).__name__}: {exc}"
        if log is None:
            log = block_log(prepared, block)
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
        else:
            print(f"block {block.name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        prepared.records.mark_failed(block, error, log)
        return None, error


def predict_here(prepared: Prepared, todo: list[Block], *, on_block: OnBlock) -> SharedOutcome:
    """Run ``todo`` in this process, one block after another; a stop signal is acted on between blocks."""
    outcome = SharedOutcome()
    for block in todo:
        interrupts.check()
        predicted, error = predict_recording_failure(prepared, block)
        if error is not None:
            outcome.failed[block.name] = error
        on_block(block, predicted, error)
    return outcome


def open_prepared(order: WorkerOrder) -> Prepared:
    """The run and the output, opened as the parent planned them (never created, never removed)."""
    from vesuvius_lab.core.inference.run_kinds import load_run
    from vesuvius_lab.core.inference.volume_predict import prepare
    from vesuvius_lab.core.training.trainer import resolve_device

    predictor = load_run(Path(order.run), device=resolve_device(order.device), overrides=list(order.overrides),
                         checkpoint_name=order.request.checkpoint)
    return prepare(predictor, replace(order.request, resume=True, force=False))


def _worker(order: WorkerOrder, tasks, results, parent: int) -> None:
    children.adopt(children.Parent(parent, True), signum=signal.SIGTERM)
    pin_from_environment()
    try:
        with interrupts.stop_signals(at="after this block"):
            prepared = open_prepared(order)
            results.put(("ready",))
            while True:
                interrupts.check()
                try:
                    block = tasks.get(timeout=0.25)
                except queue.Empty:
                    continue
                if block is None:
                    return
                predicted, error = predict_recording_failure(prepared, block)
                results.put(("block", block.name, predicted, error))
    except interrupts.Interrupted:
        return


def predict_with_workers(prepared: Prepared, todo: list[Block], order: WorkerOrder, jobs: int, device: str, *,
                         on_block: OnBlock) -> SharedOutcome:
    """Run ``todo`` on ``jobs`` worker processes, on slots of ``device`` (resolved: "cpu" or "cuda");
    ``on_block(block, predicted, error)`` after each.
    Raises :class:`~vesuvius_lab.core.interrupts.Interrupted` after every worker stopped, when a stop
    signal came."""
    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    count = max(1, min(jobs, len(todo)))  # no more workers than blocks: each gets a larger share of the cores
    pool = machine_pool(count, device)
    workers = []
    for _ in range(count):
        lease = pool.take(1)
        with children.scoped_environ(**lease.environment()):
            worker = context.Process(target=_worker, args=(order, tasks, results, os.getpid()), daemon=False)
            worker.start()
        workers.append(worker)
    by_name = {block.name: block for block in todo}
    outcome, ready, fed = SharedOutcome(), 0, False
    with interrupts.passed_on() as new_signals:
        while True:
            for signum in new_signals():
                for worker in workers:
                    if worker.is_alive():
                        os.kill(worker.pid, signal.SIGTERM)  # each stops after its block in flight
            alive = sum(worker.is_alive() for worker in workers)
            if not fed and alive and ready >= alive:  # every worker has opened the run: all start together
                for block in todo:
                    tasks.put(block)
                for _ in workers:
                    tasks.put(None)  # one end mark per worker, after every block
                fed = True
            try:
                message = results.get(timeout=0.25)
            except queue.Empty:
                if not any(worker.is_alive() for worker in workers):
                    break
                continue
            if message[0] == "ready":
                ready += 1
                continue
            _, name, predicted, error = message
            if error is not None:
                outcome.failed[name] = error
            on_block(by_name[name], predicted, error)
    for worker in workers:
        worker.join()
        if worker.exitcode not in (0, None):
            outcome.died.append(worker.exitcode)
    tasks.cancel_join_thread()
    interrupts.check()  # stopped by a signal: say so (exit 130/143), not as blocks left
    return outcome
