"""``vlab run``: several experiments (their sweeps expanded) and folds trained one after another.

A job whose run already exists, finished, with the same resolved spec (same experiment name,
fold and every setting) is skipped; one whose run of the same spec was killed or interrupted after
saving a checkpoint is resumed from it, so a batch started again loses no finished epoch. A job
that fails is reported and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from vesuvius_lab.core import interrupts
from vesuvius_lab.core.config.experiment import LoadedExperiment, Problem
from vesuvius_lab.core.config.project import Project
from vesuvius_lab.core.config.spec import TUNING_FIELDS, Experiment
from vesuvius_lab.core.config.checked import check_files
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.runs.folder import Run, damaged_run, damaged_run_error, find_runs
from vesuvius_lab.core.runs.records import read_run
from vesuvius_lab.core.training.ensemble_run import build_ensemble


@dataclass(frozen=True)
class Job:
    """One experiment on one fold, its spec resolved against the project."""

    loaded: LoadedExperiment
    spec: Experiment  # resolved: what the run's spec.json will hold

    @property
    def label(self) -> str:
        return f"{self.spec.name} fold {self.spec.data.fold}"


@dataclass(frozen=True)
class Outcome:
    job: Job
    # "trained", "resumed", "skipped" or "failed"; with --jobs or a launcher also "killed" (its process
    # was killed from outside), "interrupted" (stopped by a signal, resumable), "submitted" or "held" (--no-wait)
    status: str
    run: Run | None = None
    error: str | None = None
    job_id: str | None = None  # the launcher's id of the job's process (a SLURM job id, a local pid)


def parse_folds(text: str | None) -> list[int] | str | None:
    """``--folds``: None (each experiment's own data.fold), "all", or a list such as ``0,2``."""
    if text is None or text.strip().lower() == "all":
        return None if text is None else "all"
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--folds {text!r}: give 'all' or fold numbers separated by commas, e.g. --folds 0,1,2.") from None
    if not folds or min(folds) < 0:
        raise UserError(f"--folds {text!r}: give 'all' or fold numbers from 0, e.g. --folds 0,1,2.")
    return list(dict.fromkeys(folds))


def plan(files: Iterable[str | Path], project: Project, *, overrides: Iterable[str] = (),
         folds: list[int] | str | None = None, nproc: int | None = None) -> tuple[list[Job], list[Problem]]:
    """Every (experiment, fold) to run, and every problem of every file (the others still run)."""
    loaded_all, problems = check_files(files, overrides)
    jobs, ensembles = [], []
    for loaded in loaded_all:
        resolved = project.resolve(loaded.spec)
        if resolved.ensemble is not None:  # combines trained runs: one job, after every training job
            ensembles.append(Job(dataclasses.replace(loaded, spec=resolved), resolved))
            continue
        if nproc:
            resolved = resolved.model_copy(update={"train": resolved.train.model_copy(update={"nproc": nproc})})
        count = resolved.data.folds
        wanted = range(count) if folds == "all" else folds if folds is not None else [resolved.data.fold]
        for fold in wanted:
            if fold != "all" and fold >= count:
                problems.append(Problem(str(loaded.file), None, "data.fold", f"{loaded.spec.name}: fold {fold} does "
                                        f"not exist; data.folds = {count} (folds 0 to {count - 1})."))
                continue
            spec = resolved.model_copy(update={"data": resolved.data.model_copy(update={"fold": fold})})
            jobs.append(Job(dataclasses.replace(loaded, spec=spec), spec))
    return jobs + ensembles, problems


def _canonical(spec: dict) -> str:
    """The spec as compared between runs; [tune] is what `vlab tune` searches later and [[tracker]] where a
    run is watched, not how it trains (adding a tracker retrains nothing)."""
    return json.dumps({k: v for k, v in spec.items() if k not in (*TUNING_FIELDS, "tracker")}, sort_keys=True, default=str)


def _same_spec_runs(runs_dir: Path, spec: Experiment):
    """(run, state) of every run of this experiment name whose recorded spec equals ``spec``, newest first."""
    wanted = _canonical(json.loads(json.dumps(spec.model_dump(mode="json"))))
    for run in sorted(find_runs(Path(runs_dir)), key=lambda r: r.path.name, reverse=True):
        if run.experiment != spec.name:
            continue
        recorded = run.read("spec.json")
        if isinstance(recorded, dict) and _canonical(recorded) == wanted:
            yield run, read_run(run).state


def finished_run(runs_dir: Path, spec: Experiment) -> Run | None:
    """A finished run of this experiment name whose recorded spec equals ``spec``, if any."""
    return next((run for run, state in _same_spec_runs(runs_dir, spec) if state == "finished"), None)


#: Run states that ``vlab run`` resumes: stopped from outside, not by an error of their own.
RESUMABLE_STATES = ("killed", "interrupted")


def resumable_run(runs_dir: Path, spec: Experiment) -> Run | None:
    """The newest killed or interrupted run of this spec that saved ``checkpoints/last.pt``, if any. A run of
    the experiment and fold whose records are damaged is refused, never replaced by a new run unasked."""
    for run, state in _same_spec_runs(runs_dir, spec):
        if state in RESUMABLE_STATES and (run.checkpoints / "last.pt").is_file():
            return run
    damaged = damaged_run(runs_dir, spec.name, spec.data.fold)
    if damaged is not None:
        raise damaged_run_error(*damaged, "vlab run FILE")
    return None


@interrupts.stop_signals(at="at the next safe point of this job; no more jobs start")
def run_jobs(jobs: list[Job], project: Project, *, force: bool = False,
             on_start: Callable[[int, Job, Run | None], None] | None = None,
             on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Train each job unless a finished identical run exists, resuming a killed or interrupted one
    (``force`` starts a new run anyway). A stop signal stops the job in progress at its next safe point,
    and no job starts after it."""
    outcomes = []
    for position, job in enumerate(jobs):
        interrupts.check()
        existing = None if force else finished_run(project.runs_dir, job.spec)
        if existing is not None:
            outcome = Outcome(job, "skipped", existing)
        else:
            resume = None if force or job.spec.ensemble is not None else resumable_run(project.runs_dir, job.spec)
            if on_start:
                on_start(position, job, resume)
            before = set(find_runs(project.runs_dir))
            try:
                # The spec is already resolved; resolving again is a no-op. nproc rides in the spec.
                outcome = Outcome(job, "resumed" if resume else "trained", _execute(job, project, resume))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one experiment failing must not stop the others
                started = [r for r in find_runs(project.runs_dir) if r not in before and r.experiment == job.spec.name]
                message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                outcome = Outcome(job, "failed", started[0] if started else None, message)
        outcomes.append(outcome)
        if on_done:
            on_done(outcome)
    return outcomes


def _execute(job: Job, project: Project, resume: Run | None = None) -> Run:
    """Train the job's experiment (continuing ``resume``), or build it when it is an ensemble of trained runs."""
    from vesuvius_lab.core.training.trainer import resolve_device, train  # imports torch: only when a job runs

    if job.spec.ensemble is not None:
        return build_ensemble(job.loaded, project, device=resolve_device(project.settings.device))
    if resume is not None:
        return train(None, project, resume=resume.path)
    return train(job.loaded, project)
