"""The members of an ensemble: from the ``[ensemble]`` table to finished runs, and back from a run's record.

A member is one or more runs of one experiment. ``{ experiment = "x", folds = "all" }`` is the
newest finished run of every fold of ``x`` (``folds = [0, 2]``: of those folds); a run directory
is that run alone. Each run holds out the volumes of its validation fold: it never trained on
them, so its prediction of them is out-of-fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vesuvius_lab.core.config.spec import EnsembleMember, EnsembleSpec, Experiment
from vesuvius_lab.core.data.split import make_split
from vesuvius_lab.core.errors import UserError, brief
from vesuvius_lab.core.registry import suggest
from vesuvius_lab.core.runs.folder import Run, effective_state


@dataclass(frozen=True)
class MemberRun:
    run: Run
    spec: Experiment  # as the run recorded it
    holds_out: frozenset[str]  # ids of the training volumes it did not train on (its validation fold)


@dataclass(frozen=True)
class Member:
    label: str
    weight: float
    runs: tuple[MemberRun, ...]
    inference: dict[str, Any]  # [inference] overrides its runs predict with

    def runs_for(self, volume_id: str | None) -> tuple[MemberRun, ...]:
        """The runs whose predictions count for a volume: those that held it out, if any, else all of them."""
        held = tuple(r for r in self.runs if volume_id is not None and volume_id in r.holds_out)
        return held or self.runs


def resolve_members(ensemble: EnsembleSpec, runs_dir: Path, data_root: Path) -> list[Member]:
    """Every member's finished runs; a clear error for a member that is missing or unfinished."""
    members = []
    for index, ref in enumerate(ensemble.members):
        runs = _experiment_runs(ref, runs_dir) if ref.experiment is not None else [_run_dir(ref.run, runs_dir)]
        member_runs = tuple(MemberRun(run, spec, held_out(spec, data_root)) for run, spec in runs)
        weight = ensemble.weights[index] if ensemble.weights else 1.0
        members.append(Member(ref.label, weight, member_runs, ref.inference))
    return members


def validation_volumes(members: list[Member], ids: list[str]) -> list[str]:
    """The training volumes every member holds out (in ``ids`` order): the ensemble is scored on these."""
    return [i for i in ids if all(any(i in run.holds_out for run in m.runs) for m in members)]


def held_out(spec: Experiment, data_root: Path) -> frozenset[str]:
    """The validation ids of a run's fold, from its own data root (or ``data_root`` when that moved)."""
    root = spec.data.root if spec.data.root is not None and Path(spec.data.root).is_dir() else data_root
    data = spec.data.model_copy(update={"root": Path(root)})
    return frozenset(make_split(spec.model_copy(update={"data": data})).val_ids)


# --------------------------------------------------------------------------- finding the runs


def _member_spec(run: Run, label: str) -> Experiment:
    try:
        spec = Experiment.model_validate(run.read("spec.json"))
    except (ValidationError, ValueError, TypeError) as exc:
        raise UserError(f'ensemble member "{label}": {run.path / "spec.json"} is not a valid experiment record '
                        f"({brief(exc)}). Use another run.") from None
    if spec.ensemble is not None:
        raise UserError(f'ensemble member "{label}": {run.path} is itself an ensemble. List its members in '
                        "this [ensemble] instead (its test-time average is not an out-of-fold prediction).")
    return spec


def _run_dir(text: str, runs_dir: Path) -> tuple[Run, Experiment]:
    """A run given as a path, or as ``<experiment>/<run-id>`` inside the runs directory; finished."""
    for candidate in (Path(text).expanduser(), Path(runs_dir) / text):
        if (candidate / "spec.json").is_file():
            run = Run(candidate.resolve())
            break
    else:
        raise UserError(f'ensemble member "{text}": not a run directory (no spec.json there, nor under '
                        f'{runs_dir}). Give a run folder such as runs/<experiment>/<run-id>, or a table '
                        '{ experiment = "<name>", folds = "all" }; `vlab leaderboard --runs` lists the runs.')
    state = effective_state(run)
    if state != "finished":
        raise UserError(f'ensemble member "{text}": the run {run.path} is {state}, not finished. Only finished '
                        f"runs can be combined: finish it (`vlab train --resume {run.path}`) or remove the member.")
    return run, _member_spec(run, text)


def _newest_first(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda r: ((r.read("env.json") or {}).get("started_unix") or 0.0, r.id), reverse=True)


def _experiment_runs(ref: EnsembleMember, runs_dir: Path) -> list[tuple[Run, Experiment]]:
    """The newest finished run of each wanted fold of an experiment."""
    name, folder = ref.experiment, Path(runs_dir) / ref.experiment
    runs = _newest_first([Run(p.parent) for p in folder.glob("*/spec.json")]) if folder.is_dir() else []
    if not runs:
        known = sorted(p.name for p in Path(runs_dir).glob("[!.]*") if p.is_dir()) if Path(runs_dir).is_dir() else []
        raise UserError(f'ensemble member "{name}": no runs of this experiment under {runs_dir}.'
                        f"{suggest(name, known)} Train it first (`vlab run <its file> --folds all`); the name is "
                        f"the `name` of its experiment file. Experiments with runs: {', '.join(known) or 'none'}.")
    finished = [(run, _member_spec(run, name)) for run in runs if effective_state(run) == "finished"]
    count = (finished[0][1] if finished else _member_spec(runs[0], name)).data.folds
    wanted = list(range(count)) if ref.folds == "all" else ref.folds
    beyond = [fold for fold in wanted if fold >= count]
    if beyond:
        raise UserError(f'ensemble member "{name}": fold(s) {", ".join(map(str, beyond))} do not exist; its runs '
                        f"use {count} folds (0 to {count - 1}). Fix folds in the [ensemble] table.")
    chosen, missing = [], []
    for fold in wanted:
        match = next(((r, s) for r, s in finished if s.data.fold == fold and s.data.folds == count), None)
        if match is None:
            states = [effective_state(r) for r in runs
                      if (r.read("spec.json") or {}).get("data", {}).get("fold") == fold]
            missing.append(f"{fold} ({states[0] if states else 'no run'})")
        else:
            chosen.append(match)
    if missing:
        have = [s.data.fold for _, s in chosen]
        hint = f", or list the finished folds only, e.g. folds = {have}" if have else ""
        raise UserError(f'ensemble member "{name}": no finished run for fold(s) {", ".join(missing)} of its {count} '
                        f"folds under {folder}. Train them (`vlab run <its file> --folds all`, or `vlab train "
                        f"<its file> --fold K`){hint}.")
    return chosen


# --------------------------------------------------------------------------- the record of an ensemble run


def members_record(members: list[Member], runs_dir: Path) -> list[dict]:
    """What ``members.json`` holds: the exact runs combined, so predicting later uses the same ones."""
    return [{"label": m.label, "weight": m.weight, "inference": m.inference,
             "runs": [{"run": _relative(r.run.path, runs_dir), "fold": r.spec.data.fold,
                       "holds_out": sorted(r.holds_out)} for r in m.runs]}
            for m in members]


def members_from_record(record: list[dict], runs_dir: Path, ensemble_run: Run) -> list[Member]:
    members = []
    for entry in record:
        runs = []
        for item in entry["runs"]:
            path = Path(item["run"]) if Path(item["run"]).is_absolute() else Path(runs_dir) / item["run"]
            if not (path / "spec.json").is_file():
                raise UserError(f"{ensemble_run.path}: its member run {path} is gone. Restore it, or build the "
                                "ensemble again from its experiment file (`vlab ensemble FILE`).")
            run = Run(path.resolve())
            runs.append(MemberRun(run, _member_spec(run, entry["label"]), frozenset(item.get("holds_out", ()))))
        members.append(Member(entry["label"], float(entry["weight"]), tuple(runs), entry.get("inference") or {}))
    return members


def _relative(path: Path, runs_dir: Path) -> str:
    """``<experiment>/<run-id>`` when the run lies in the runs directory (which may move), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(runs_dir).resolve()))
    except ValueError:
        return str(Path(path).resolve())
