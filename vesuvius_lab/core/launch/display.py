"""One progress display for every job of a batch: a line per job with its epochs, state, devices and time.

The jobs' own output (epoch lines, warnings) goes to their run's ``log.txt`` and to the batch's
``job-NNN.log``; this display reads the runs' records (``metrics.jsonl``, ``status.json``), so it
shows the same thing whichever process, or machine, trains a run.
"""

from __future__ import annotations

import math
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from vesuvius_lab.core.console import err
from vesuvius_lab.core.runs.folder import Run

STATE_STYLES = {"queued": "dim", "running": "cyan", "trained": "green", "resumed": "green", "skipped": "dim",
                "failed": "bold red", "killed": "bold red", "interrupted": "yellow"}
REFRESH_S = 1.0


class JobBoard:
    """Context manager around a rich Progress with one task per job (rank of the batch = task order)."""

    def __init__(self, jobs: list):
        self.jobs = jobs
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                                 TextColumn("{task.fields[epochs]}"), TextColumn("{task.fields[state]}"),
                                 TextColumn("[dim]{task.fields[where]}"), TimeElapsedColumn(),
                                 console=err, refresh_per_second=2)
        self.tasks: list = []
        self.read_at: dict[int, float] = {}

    def __enter__(self) -> "JobBoard":
        for job in self.jobs:
            total = 1 if job.spec.ensemble is not None else job.spec.train.epochs
            self.tasks.append(self.progress.add_task(_escape(job.label), total=total, start=False,
                                                     epochs=f"0/{total}", state=_state("queued"), where=""))
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def started(self, position: int, where: str, job_id: str = "") -> None:
        task = self.tasks[position]
        self.progress.start_task(task)
        self.progress.update(task, state=_state("running"), where=" ".join(filter(None, [where, f"[{job_id}]"
                                                                                        if job_id else ""])))

    def follow(self, position: int, run: Run | None) -> None:
        """Epochs done and the last validation score of the job's run (read at most once a second)."""
        if run is None or time.time() - self.read_at.get(position, 0) < REFRESH_S:
            return
        self.read_at[position] = time.time()
        self._show_run(position, run, "running")

    def ended(self, position: int, status: str, run: Run | None) -> None:
        task = self.tasks[position]
        if run is not None:
            self._show_run(position, run, status)
        else:
            self.progress.update(task, state=_state(status))
        if status in ("trained", "resumed", "skipped"):
            self.progress.update(task, completed=self.progress.tasks[position].total)
        if self.progress.tasks[position].started:
            self.progress.stop_task(task)

    def _show_run(self, position: int, run: Run, state: str) -> None:
        task = self.tasks[position]
        total = self.progress.tasks[position].total
        metrics = run.metrics()
        done = len(metrics)
        score = next((m["val"].get("score") for m in reversed(metrics) if isinstance(m.get("val"), dict)), None)
        text = _state(state) + (f" score {score:.4f}" if isinstance(score, (int, float)) and math.isfinite(score)
                                else "")
        self.progress.update(task, completed=min(done, total), epochs=f"{min(done, total):g}/{total:g}", state=text)


def _state(state: str) -> str:
    style = STATE_STYLES.get(state, "")
    return f"[{style}]{state}[/]" if style else state


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
