"""``vlab predict ... --output OUT.zarr --launcher slurm``: the blocks as a job array, through submitit.

The submitting process plans the blocks and creates the output, as for one process; then it submits
one array of ``--jobs`` tasks, each over a contiguous range of the blocks left (the order of the plan,
so a task reads neighbouring input). A task opens the run and the output itself, skips blocks that are
done meanwhile, and records each block as a local worker does (a block that raises is recorded failed
with the task's log, and the others go on). The submission is recorded in
``OUT.zarr/.vlab/submissions.json`` (job ids, log folder), for ``vlab predict --status OUT.zarr``.

Re-submitting the same command with ``--resume`` submits only the blocks left: a task that was
killed, preempted or timed out loses only its block in flight. The submitting process waits (a
progress bar over the done records) and builds the pyramid once every block is done; with
``--no-wait`` it returns after submitting, and the same command with ``--resume`` finishes later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from vesuvius_lab.core import interrupts
from vesuvius_lab.core.files import write_text_atomic
from vesuvius_lab.core.inference.blocks import Block
from vesuvius_lab.core.inference.volume_predict import Prepared
from vesuvius_lab.core.launch.predict_jobs import WorkerOrder, open_prepared, predict_recording_failure
from vesuvius_lab.core.launch.slots import split_evenly
from vesuvius_lab.core.launch.submit import job_parameters, make_executor

SUBMISSIONS = "submissions.json"


def predict_block_range(order: WorkerOrder, names: list[str]) -> dict:
    """One array task: the named blocks not done yet. Returns what it did (submitit keeps it)."""
    import submitit

    try:
        log = Path(submitit.JobEnvironment().paths.stderr)
    except RuntimeError:  # not inside a submitit job (called directly)
        log = None
    prepared = open_prepared(order)
    wanted = set(names)
    done = failed = 0
    with interrupts.stop_signals(at="after this block"):  # SLURM's SIGTERM before a time limit or preemption
        for block in prepared.plan.blocks():
            if block.name not in wanted or prepared.records.done(block) is not None:
                continue
            interrupts.check()
            predicted, error = predict_recording_failure(prepared, block, log)
            done, failed = done + (error is None), failed + (error is not None)
    return {"done": done, "failed": failed}


def submit_blocks(prepared: Prepared, todo: list[Block], order: WorkerOrder, *, kind: str, tasks: int,
                  settings, folder: Path) -> list:
    """Submit ``todo`` as an array of ``tasks`` tasks over contiguous ranges of blocks: its submitit jobs."""
    ranges = [list(part) for part in split_evenly(tuple(range(len(todo))), max(1, min(tasks, len(todo))))]
    executor = make_executor(kind, folder)
    executor.update_parameters(**job_parameters(kind, settings, 1, f"vlab-predict-{Path(order.request.output).stem}"))
    if kind == "slurm" and len(ranges) > 1:
        executor.update_parameters(array_parallelism=len(ranges))
    names = [[todo[i].name for i in part] for part in ranges]
    jobs = executor.map_array(predict_block_range, [order] * len(names), names)
    _record(prepared, jobs, folder, len(todo))
    return jobs


def _record(prepared: Prepared, jobs: list, folder: Path, blocks: int) -> None:
    path = prepared.records.root / SUBMISSIONS
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        history = []
    history.append({"submitted_unix": time.time(), "blocks": blocks, "log_folder": str(folder),
                    "jobs": [str(job.job_id) for job in jobs]})
    write_text_atomic(path, json.dumps(history, indent=2) + "\n")


def wait_for(jobs: list, prepared: Prepared, *, on_progress: Callable[[int], None]) -> list[str]:
    """Wait until every task ended, calling ``on_progress(done blocks)`` as records appear; a stop signal
    cancels the tasks (SIGTERM: each stops after its block in flight). Returns how each task ended
    when it did not end well ("job 123_1: ...")."""
    problems: list[str] = []
    with interrupts.passed_on() as new_signals:
        while True:
            if new_signals():
                for job in jobs:
                    if not job.done():
                        job.cancel(check=False)
            on_progress(len(prepared.records.done_names()))
            if all(job.done() for job in jobs):
                break
            time.sleep(0.5)
    interrupts.check()  # stopped by a signal: the tasks are cancelled, say so (exit 130/143)
    for job in jobs:
        problems += _ending(job)
    on_progress(len(prepared.records.done_names()))
    return problems


def _ending(job) -> list[str]:
    from submitit.core.utils import UncompletedJobError

    try:
        job.result()
        return []
    except UncompletedJobError:
        return [f"job {job.job_id} ended without finishing (killed, preempted or out of time); its log: "
                f"{job.paths.stderr}"]
    except Exception as exc:  # noqa: BLE001 - said with the task's log, which has the traceback
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return [f"job {job.job_id} failed: {last}; its log: {job.paths.stderr}"]
