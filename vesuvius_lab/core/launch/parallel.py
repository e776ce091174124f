"""``vlab run --jobs N`` and ``--launcher``: the queue of a batch, several jobs at once, each in its own process.

Every job runs in a process of its own (:mod:`~vesuvius_lab.core.launch.worker`), so a job that
crashes or is killed takes no other down, and each one holds its own run's lock: records never
interleave. The queue decides as ``vlab run`` always has, when a job's turn comes: a finished run of
the same spec is skipped, a killed or interrupted one resumed. A job waits for the jobs it depends
on: an ensemble for every job before it (its members), a job for an earlier one with the same spec
(the second is then skipped). Jobs start in order, each when its devices are free
(:mod:`~vesuvius_lab.core.launch.slots`).

A job that fails, or is killed from outside (SIGKILL, the OOM killer), is reported and the queue
goes on; its run shows as killed in the leaderboard (its process is gone) and the next ``vlab run``
resumes it. Ctrl-C or SIGTERM to ``vlab run`` is passed on to every running job, each saves its run
and stops (interrupted, resumable), and the batch stops without starting more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from vesuvius_lab.core import children, interrupts
from vesuvius_lab.core.training.cpu_share import FILE_VARIABLE, write_cores
from vesuvius_lab.core.config.project import Project
from vesuvius_lab.core.console import err
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.launch.batch import Job, Outcome, _canonical, _same_spec_runs, finished_run, resumable_run, run_jobs
from vesuvius_lab.core.launch.display import JobBoard
from vesuvius_lab.core.launch.slots import Lease, Pool, lend_free_cores, machine_pool
from vesuvius_lab.core.launch.submit import SUBMITIT_LAUNCHERS, SubmititHandle, job_parameters, make_executor
from vesuvius_lab.core.launch.worker import WARM_FLAG, Ended, Payload, read_result, write_payload
from vesuvius_lab.core.runs.folder import Run, find_runs

LAUNCHERS = ("local", *SUBMITIT_LAUNCHERS)
POLL_S = 0.25


OnStart = Callable[[int, Job, "Run | None"], None]
OnDone = Callable[[Outcome], None]


def run_batch(jobs: list[Job], project: Project, *, at_once: int | None = None, launcher: str = "local",
              wait: bool = True, force: bool = False, on_start: OnStart | None = None,
              on_done: OnDone | None = None, warm: WarmWorkers | None = None) -> list[Outcome]:
    """``vlab run``: one job after another in this process (``local``, one at a time, as always), or the
    queue of this module with ``at_once`` jobs at once on this machine or through submitit (``warm``:
    from :func:`start_warm_workers`, called before the jobs were planned)."""
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher {launcher}: choose one of {', '.join(LAUNCHERS)}.")
    if not wait and launcher == "local":
        raise UserError("--no-wait needs --launcher slurm (or submitit-local): local jobs are children of this "
                        "command and end with it.")
    if launcher == "local" and (at_once or 1) == 1:
        return run_jobs(jobs, project, force=force, on_start=on_start, on_done=on_done)
    folder = warm.folder if warm is not None else _batch_folder(project)
    if not wait:
        return submit_all(jobs, project, launcher, folder, force=force, on_done=on_done)
    limit = at_once or (len(jobs) if launcher == "slurm" else 1)
    return run_queue(jobs, project, _launcher(launcher, project, limit, folder, warm), force=force,
                     on_start=on_start, on_done=on_done)


def start_warm_workers(project: Project, at_once: int | None, launcher: str, experiments: int) -> WarmWorkers | None:
    """For ``vlab run --jobs N`` on this machine: a warm worker for each of the first slots (as many as
    there are experiment files, at most N), started now so that their imports overlap the planning.
    The caller closes them once the batch has ended, however it ended (``with`` or :meth:`WarmWorkers.close`)."""
    if launcher != "local" or (at_once or 1) == 1:
        return None
    return WarmWorkers(machine_pool(at_once, _device_kind(project.settings.device)), _batch_folder(project),
                       count=min(at_once, experiments))


# --------------------------------------------------------------------------- launchers


class LocalHandle:
    """A job's process on this machine, in a session of its own (so that a terminal's Ctrl-C reaches
    this command only, which passes it on)."""

    def __init__(self, process: subprocess.Popen, log: Path, result: Path, payload: Path):
        self.process, self.result, self.payload, self.log = process, result, payload, log
        self.id = str(process.pid)

    def ended(self) -> Ended | None:
        code = self.process.poll()
        if code is None:
            return None
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            return Ended("killed", None, f"its process was killed by {name}")
        result = read_result(self.result)
        if result is None:
            return Ended("failed", None, f"exited with status {code} without a result; see {self.log}\n"
                                         + _tail(self.log))
        return Ended(result["status"], result.get("run"), result.get("error"))

    def stop(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def finish(self) -> None:
        """After the job ended: a job killed from outside may leave its own children (DDP ranks, data
        loader workers) behind; they are in its session's process group, which is ended with it."""
        if self.process.returncode is not None and self.process.returncode < 0:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.payload.unlink(missing_ok=True)


def _worker_process(arguments: list[str], env: dict[str, str], log: Path, *, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """``python -m vesuvius_lab.core.launch.worker ARGUMENTS`` in a session of its own, its output to ``log``."""
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "vesuvius_lab.core.launch.worker", *arguments],
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1", **children.environment()},
                                stdin=stdin, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


class WarmWorkers:
    """One worker process per slot, started before ``vlab run`` plans its jobs: each imports torch,
    MONAI and the trainer (several seconds) on its slot's cores while the command plans, then waits
    for a job. A job that needs one slot starts in that slot's warm worker; others start cold."""

    def __init__(self, pool: Pool, folder: Path, count: int):
        self.pool, self.folder = pool, folder
        self.waiting: dict[int, tuple[subprocess.Popen, Path]] = {}
        for slot in pool.slots[:count]:
            lease = Lease((slot,))
            log = folder / f"warm-{slot.index + 1}.log"
            process = _worker_process([WARM_FLAG], {**_vlab_environment(), **lease.environment()}, log,
                                      stdin=subprocess.PIPE)
            self.waiting[slot.index] = (process, log)

    def take(self, lease: Lease, payload_file: Path, result: Path, log: Path) -> subprocess.Popen | None:
        """The waiting worker of this one-slot lease, given the job (its log renamed to ``log``); None
        when there is none (or it died meanwhile)."""
        if len(lease.slots) != 1 or lease.slots[0].index not in self.waiting:
            return None
        process, warm_log = self.waiting.pop(lease.slots[0].index)
        try:
            process.stdin.write(f"{payload_file}\t{result}\n".encode())
            process.stdin.close()
        except OSError:  # it is gone (killed meanwhile): the job starts cold
            process.kill()
            return None
        warm_log.replace(log)
        return process

    def __enter__(self) -> WarmWorkers:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Workers no job came for read the end of their input and exit."""
        for process, log in self.waiting.values():
            try:
                process.stdin.close()
                process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
            log.unlink(missing_ok=True)
        self.waiting.clear()


class LocalLauncher:
    """``--launcher local``: worker processes on this machine, each on its lease of the machine's slots."""

    def __init__(self, pool: Pool, limit: int, folder: Path, warm: WarmWorkers | None = None):
        self.pool, self.limit, self.folder, self.warm = pool, limit, folder, warm

    def lease(self, job: Job) -> Lease | None:
        return self.pool.take(_devices_needed(job))

    def release(self, lease: Lease | None) -> None:
        if lease is not None:
            self.pool.give_back(lease)

    def start(self, position: int, payload: Payload, lease: Lease | None = None) -> LocalHandle:
        stem = self.folder / f"job-{position + 1:03d}"
        payload_file = write_payload(payload, stem.with_suffix(".pkl"))
        result, log = stem.with_suffix(".json"), stem.with_suffix(".log")
        result.unlink(missing_ok=True)
        process = self.warm.take(lease, payload_file, result, log) if self.warm and lease else None
        if process is None:
            process = _worker_process([str(payload_file), str(result)], payload.environment, log)
        return LocalHandle(process, log, result, payload_file)


class SubmititLauncher:
    """``--launcher slurm`` / ``submitit-local``: each job submitted through submitit. On this machine
    (the local executor) jobs are pinned to their lease like local ones; on SLURM, the cluster places them."""

    def __init__(self, kind: str, project: Project, pool: Pool | None, limit: int, folder: Path):
        self.kind, self.project, self.pool, self.limit, self.folder = kind, project, pool, limit, folder
        self.settings = project.settings.launcher
        self.executor = make_executor(kind, project.launcher_dir)

    def lease(self, job: Job) -> Lease | None:
        if self.pool is None:
            return Lease(())
        return self.pool.take(_devices_needed(job))

    def release(self, lease: Lease | None) -> None:
        if self.pool is not None and lease is not None:
            self.pool.give_back(lease)

    def start(self, position: int, payload: Payload, lease: Lease | None = None, *,
              after: list[str] = ()) -> SubmititHandle:
        job = payload.job
        parameters = job_parameters(self.kind, self.settings, job.spec.train.nproc, f"vlab-{job.spec.name}")
        if after and self.kind == "slurm":  # --no-wait: an ensemble starts once its members ended
            extra = dict(parameters.get("additional_parameters", {}))
            extra["dependency"] = "afterany:" + ":".join(after)
            parameters["additional_parameters"] = extra
        if self.kind == "slurm" and self.settings.nodes > 1 and job.spec.ensemble is None:
            payload = Payload(payload.job, payload.project, payload.resume, payload.environment, torchrun={
                "folder": str(self.folder / f"torchrun-{position + 1:03d}"), "port": self.settings.port,
                "nproc_per_node": max(1, self.settings.gpus_per_node)})
        self.executor.update_parameters(**parameters)
        from vesuvius_lab.core.launch.worker import run_submitted

        try:
            submitted = self.executor.submit(run_submitted, payload)
        except (OSError, subprocess.SubprocessError) as exc:
            raise UserError(f"{job.label}: submitting the job failed: {exc}") from None
        return SubmititHandle(submitted, self.kind)


def _launcher(kind: str, project: Project, limit: int, folder: Path, warm: WarmWorkers | None = None):
    if kind == "slurm":
        return SubmititLauncher(kind, project, None, limit, folder)
    if warm is not None:
        return LocalLauncher(warm.pool, limit, folder, warm)
    pool = machine_pool(limit, _device_kind(project.settings.device))
    if kind == "submitit-local":
        return SubmititLauncher(kind, project, pool, limit, folder)
    return LocalLauncher(pool, limit, folder)


def _device_kind(setting: str) -> str:
    """"cpu" or "cuda": what the jobs of this machine share out (``auto``: CUDA when torch sees a GPU)."""
    if setting == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if setting == "cuda":
        raise UserError("device = cuda, but torch sees no CUDA device here. Use --device cpu or auto.")
    return "cpu"


def _devices_needed(job: Job) -> int:
    """A DDP job takes a device (or core share) per process; an ensemble one."""
    return 1 if job.spec.ensemble is not None else max(1, job.spec.train.nproc)


# --------------------------------------------------------------------------- the queue


@dataclass
class _Entry:
    position: int
    job: Job
    after: set[int]
    state: str = "queued"  # queued, running, ended
    resume: Run | None = None
    lease: Lease | None = None
    handle: object = None
    run: Run | None = None
    before: frozenset = frozenset()
    looked: float = 0.0  # when its new run was last looked for
    cores_file: Path | None = None  # a CPU job on this machine: the cores it should use (it follows the file)
    cores: tuple[int, ...] = ()  # what that file says now


def dependencies(jobs: list[Job]) -> list[set[int]]:
    """For each job, the jobs that must end first: every earlier job for an ensemble (its members are
    among them), the previous job of the same spec for a repeated one."""
    keys = [_canonical(job.spec.model_dump(mode="json")) for job in jobs]
    after: list[set[int]] = []
    for i, job in enumerate(jobs):
        if job.spec.ensemble is not None:
            after.append(set(range(i)))
        else:
            earlier = [k for k in range(i) if keys[k] == keys[i]]
            after.append({earlier[-1]} if earlier else set())
    return after


def run_queue(jobs: list[Job], project: Project, launcher, *, force: bool = False, on_start: OnStart | None = None,
              on_done: OnDone | None = None) -> list[Outcome]:
    """Run every job through ``launcher``, up to ``launcher.limit`` at once; the outcomes in job order."""
    entries = [_Entry(i, job, after) for i, (job, after) in enumerate(zip(jobs, dependencies(jobs)))]
    outcomes: dict[int, Outcome] = {}
    stops: list[int] = []

    def end(entry: _Entry, outcome: Outcome) -> None:
        entry.state, outcomes[entry.position] = "ended", outcome
        board.ended(entry.position, outcome.status, outcome.run)
        if on_done:
            on_done(outcome)

    # A stop signal is passed on to every running job (each saves its run and stops); none starts after it.
    with interrupts.passed_on() as new_signals, JobBoard(jobs) as board:
        while True:
            arrived = new_signals()
            if arrived:
                if not stops:
                    err.print(f"[yellow]{signal.Signals(arrived[0]).name}:[/] every running job saves its run and "
                              "stops; no more jobs start.", highlight=False)
                stops += arrived
                for entry in entries:
                    if entry.state == "running":
                        entry.handle.stop(arrived[-1])
            if not stops:
                _dispatch(entries, project, launcher, force, end, on_start, board)
            _lend_free_cores(entries, launcher)  # after the queue took what it could
            for entry in entries:
                if entry.state == "running":
                    _follow(entry, project, launcher, end, board)
            running = any(entry.state == "running" for entry in entries)
            if not running and (stops or all(entry.state == "ended" for entry in entries)):
                break
            if not running and not any(_ready(e, entries) for e in entries if e.state == "queued"):
                break  # nothing can start: only jobs whose dependencies never end (cannot happen; be safe)
            time.sleep(POLL_S)
    if stops:
        raise interrupts.Interrupted(stops[0])
    return [outcomes[i] for i in sorted(outcomes)]


def _ready(entry: _Entry, entries: list[_Entry]) -> bool:
    return all(entries[i].state == "ended" for i in entry.after)


def _dispatch(entries, project, launcher, force, end, on_start, board) -> None:
    """Start the queued jobs whose turn it is, in order, while devices are free."""
    for entry in entries:
        if sum(e.state == "running" for e in entries) >= launcher.limit:
            return
        if entry.state != "queued" or not _ready(entry, entries):
            continue
        job = entry.job
        lease = launcher.lease(job)
        if lease is None:
            return  # in order: a later job does not overtake one that waits for its devices
        existing = None if force else finished_run(project.runs_dir, job.spec)
        if existing is not None:
            launcher.release(lease)
            end(entry, Outcome(job, "skipped", existing))
            continue
        resume = None if force or job.spec.ensemble is not None else resumable_run(project.runs_dir, job.spec)
        entry.resume, entry.lease, entry.run = resume, lease, resume
        entry.before = frozenset(run.path for run in find_runs(project.runs_dir) if run.experiment == job.spec.name)
        pinned = lease.environment() if lease.slots else {}  # on SLURM the cluster places the job
        if lease.cpus and not lease.gpus and getattr(launcher, "folder", None) is not None:
            entry.cores_file, entry.cores = launcher.folder / f"job-{entry.position + 1:03d}.cpus", lease.cpus
            write_cores(entry.cores_file, lease.cpus)
            pinned[FILE_VARIABLE] = str(entry.cores_file)
        payload = Payload(job, project, resume.path if resume else None, {**_vlab_environment(), **pinned})
        if on_start:
            on_start(entry.position, job, resume)
        try:
            entry.handle = launcher.start(entry.position, payload, lease)
        except UserError as exc:
            launcher.release(lease)
            end(entry, Outcome(job, "failed", None, str(exc)))
            continue
        entry.state = "running"
        board.started(entry.position, lease.describe() if lease.slots else "", getattr(entry.handle, "id", ""))


def _lend_free_cores(entries: list[_Entry], launcher) -> None:
    """CPU jobs on this machine: the cores of slots no job holds go to the running jobs, and back when a
    job takes them (each job's process follows its file; see :mod:`vesuvius_lab.core.training.cpu_share`)."""
    pool = getattr(launcher, "pool", None)
    running = [entry for entry in entries if entry.state == "running" and entry.cores_file is not None]
    if pool is None or not running:
        return
    for entry, cores in zip(running, lend_free_cores(pool, [entry.lease for entry in running])):
        if cores != entry.cores:
            write_cores(entry.cores_file, cores)
            entry.cores = cores


def _follow(entry: _Entry, project: Project, launcher, end, board) -> None:
    """Poll a running job: its run (once it exists) for the display, and whether it ended."""
    if entry.run is None and time.time() - entry.looked > 1.0:
        entry.looked = time.time()
        entry.run = _new_run(project, entry)
    board.follow(entry.position, entry.run)
    ended = entry.handle.ended()
    if ended is None:
        return
    entry.handle.finish()
    launcher.release(entry.lease)
    run = Run(Path(ended.run)) if ended.run else entry.run or _new_run(project, entry)
    status = ended.status
    if status == "trained" and entry.resume is not None:
        status = "resumed"
    end(entry, Outcome(entry.job, status, run, ended.error if status not in ("trained", "resumed") else None,
                       job_id=getattr(entry.handle, "id", None)))


def _new_run(project: Project, entry: _Entry) -> Run | None:
    """The run this job's process created: of its experiment, not there before it started, same spec."""
    for run, _state in _same_spec_runs(project.runs_dir, entry.job.spec):
        if run.path not in entry.before:
            return run
    return None


def _vlab_environment() -> dict[str, str]:
    """The settings a job's process must see as this one does (--data and --runs are written there)."""
    return {key: os.environ[key] for key in ("VLAB_DATA", "VLAB_RUNS") if os.environ.get(key)}


def _batch_folder(project: Project) -> Path:
    """``<runs_dir>/.batches/<time>-<pid>/``: each job's payload, outcome and console log (job-NNN.*)."""
    folder = project.runs_dir / ".batches" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(deque(text, maxlen=lines))


# --------------------------------------------------------------------------- submit and return


def submit_all(jobs: list[Job], project: Project, kind: str, folder: Path, *, force: bool = False,
               on_done: OnDone | None = None) -> list[Outcome]:
    """``--no-wait``: submit every job now and return; the outcomes are "submitted" (with the job id),
    "skipped" (finished already, or the same spec as an earlier job) or "held" (an ensemble on the local
    executor, which cannot wait for other jobs: run ``vlab run`` again once its members are done)."""
    launcher = SubmititLauncher(kind, project, None, len(jobs), folder)
    outcomes, seen, ids = [], set(), []
    for position, job in enumerate(jobs):
        key = _canonical(job.spec.model_dump(mode="json"))
        existing = None if force else finished_run(project.runs_dir, job.spec)
        if existing is not None or key in seen:
            outcome = Outcome(job, "skipped", existing, None if existing else "the same spec as an earlier job")
        elif job.spec.ensemble is not None and kind != "slurm":
            outcome = Outcome(job, "held", None, "an ensemble needs its members finished: run `vlab run` again "
                                                 "once they are")
        else:
            resume = None if force or job.spec.ensemble is not None else resumable_run(project.runs_dir, job.spec)
            payload = Payload(job, project, resume.path if resume else None, _vlab_environment())
            after = ids if job.spec.ensemble is not None else []
            try:
                handle = launcher.start(position, payload, after=list(after))
            except UserError as exc:
                outcome = Outcome(job, "failed", None, str(exc))
            else:
                ids.append(handle.id)
                outcome = Outcome(job, "submitted", resume, job_id=handle.id)
        seen.add(key)
        outcomes.append(outcome)
        if on_done:
            on_done(outcome)
    return outcomes
