"""``vlab tune``: search the chain, estimate it honestly, record a run and write the tuned experiment file.

The run, ``runs/<name>-tuned/<run-id>/``, holds like any run ``spec.json`` (the experiment with the
tuned chain), ``env.json``, ``status.json``, ``scores.json`` and ``summary.json``, and also
``tuning.json`` (the space, the source runs, the cases, the untuned, in-sample and
cross-validated scores, the best values), ``trials.json`` (every trial) and ``study.db`` (the
Optuna storage, unless ``--storage`` names another). Its score is the cross-validated one: for
each group of volumes, the chain tuned on the other groups scored on that group. Started again
after a kill or Ctrl-C, ``vlab tune`` continues the same run and the trials it lacks.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vesuvius_lab.core import interrupts
from vesuvius_lab.core.config.checked import read_experiment
from vesuvius_lab.core.config.experiment import load_experiment
from vesuvius_lab.core.config.project import Project
from vesuvius_lab.core.config.spec import Experiment, TuneOptions, TuneRange
from vesuvius_lab.core.config.sweep import toml_value
from vesuvius_lab.core.console import err
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import write_text_atomic
from vesuvius_lab.core.inference.postprocess import build_chain
from vesuvius_lab.core.metric.score import VolumeScore, mean_scores
from vesuvius_lab.core.runs.folder import (TUNING_RECORD, Run, effective_state, environment, find_runs, new_run,
                                           read_spec)
from vesuvius_lab.core.runs.lock import RunLock
from vesuvius_lab.core.runs.records import resolve_run
from vesuvius_lab.core.runs.summary import write_summary
from vesuvius_lab.core.tuning.cases import Case, check_sources, gather_cases, source_runs
from vesuvius_lab.core.tuning.scoring import CaseScorer
from vesuvius_lab.core.tuning.space import apply_values, values_of
from vesuvius_lab.core.tuning.storage import (DamagedStorage, check_studies, open_storage, prepare_studies, rebuild,
                                              shown)
from vesuvius_lab.core.tuning import plateau
from vesuvius_lab.core.tuning.notices import Notice, all_notices, profiles
from vesuvius_lab.core.tuning.objective import Objective, volume_groups
from vesuvius_lab.core.tuning.study import REFUSED, Search, best_values, chain_of, trial_records

TRIALS_FILE = "trials.json"
STUDY_FILE = "study.db"
RESUMABLE = ("killed", "interrupted")
#: What makes two tunings one: the keys of tuning.json compared (a run without "choice" chose the mean's best).
IDENTITY_KEYS = ("space", "sources", "choice")
#: The records that say whether a tuning run can be continued.
RECORDS = (TUNING_RECORD, "status.json", "spec.json")


@interrupts.stop_signals(at="after the trial in progress")
def tune(target: str, project: Project, *, trials: int, workers: int, storage: str | None = None,
         device: str = "cpu", overrides: list[str] = (), force: bool = False, options: dict | None = None) -> Run:
    """Tune the chain of ``target`` (an experiment file with ``[tune]``, or a run) and return the tuning run.

    ``options`` replace the file's own (``objective``, ``k``, ``group_by``, ``plateau``: see
    :class:`~vesuvius_lab.core.config.spec.TuneOptions`). Everything the user gave is checked before a
    run folder is created or continued: the file (every check of ``vlab validate``), the source runs, a
    killed run's records, and the study storage."""
    spec, file, sources = _target(target, project, list(overrides))
    if options:
        chosen = TuneOptions.model_validate({**spec.tune_options.model_dump(), **options})
        spec = spec.model_copy(update={"tune_options": chosen})
    if not spec.tune:
        raise UserError(f"{file or target}: no range to search in [tune] (its options, such as objective, say how to "
                        "search, not what). Add a key with its range, e.g.\n"
                        '[tune]\n"inference.threshold" = { low = 0.2, high = 0.7 }\n'
                        "(see docs/tuning.md).")
    check_sources(sources)
    identity = tuning_identity(spec, sources)
    name = f"{spec.name}-tuned"
    run = None if force else _resumable(project.runs_dir, name, identity, target)
    if storage is not None:  # the user's database: refused before a run exists, never repaired here
        prepare_studies(storage, name, identity, list(spec.tune))
    run = run or _new_run(spec, project, device)
    with RunLock(run):
        if storage is None:
            _own_study(run, name, identity, list(spec.tune), target)
        return _tune(run, spec, file, sources, identity, project, trials=trials, workers=workers,
                     storage=storage, device=device)


def _tune(run: Run, spec: Experiment, file: Path | None, sources: list[Run], identity: dict, project: Project, *,
          trials: int, workers: int, storage: str | None, device: str) -> Run:
    started = time.time()
    storage = storage or f"sqlite:///{run.path / 'study.db'}"
    record = {**identity, "target": str(file) if file else None, "trials": trials, "storage": shown(storage),
              "study": f"{spec.name}-tuned"}
    run.write(TUNING_RECORD, record)
    run.set_status("running")
    try:
        cases = gather_cases(sources, run.path, project.cache_dir, device)
        interrupts.check()
        record["cases"] = [case.to_dict() for case in cases]
        folds = groups_of(cases)
        groups, grouped_by = volume_groups({c.id: c.scroll for c in cases}, {c.id: c.group for c in cases},
                                           spec.tune_options.group_by)
        objective = Objective(spec.tune_options.objective, groups, spec.tune_options.k)
        record.update(objective=objective.describe(), volume_groups={"by": grouped_by, "groups": groups})
        _log(run, f"tuning {len(spec.tune)} key(s) on {len(cases)} out-of-fold volume(s) in {len(folds)} fold "
                  f"group(s), {trials} trial(s) per search; objective: {objective.describe()} (groups: "
                  f"{len(set(groups.values()))} {grouped_by}(s))"
                  + (f"; plateau {spec.tune_options.plateau:g}" if spec.tune_options.plateau else ""))
        with CaseScorer(cases, ignore_label=spec.data.ignore_label, workers=workers,
                        runs_dir=project.runs_dir) as scorer, _progress(trials * (1 + len(folds))) as tick:
            ids = [case.id for case in cases]
            untuned = scorer.score(chain_of(spec), ids)
            search = Search(record["study"], spec.tune, spec, ids, storage, spec.train.seed or 0, objective, identity,
                            _keeper(run, record["study"], spec.tune))
            chooser = _Chooser(run, scorer, spec.tune_options.plateau, tick.note)
            study = search.run(scorer, trials, lambda best: tick("search", best))
            best, flatness = chooser.choose(search, study)
            tuned = apply_values(spec, best)
            in_sample = scorer.score(chain_of(tuned), ids)
            held_out, per_group = _cross_validate(search, cases, folds, scorer, trials, tick, chooser)
            found = profiles(search.space, best, lambda values: chooser.evaluate(search, values))
            notices = _notices(search, study, best, groups, found, project.runs_dir)
        record.update(best=best, plateau=flatness, profiles={k: [list(p) for p in v] for k, v in found.items()},
                      groups=per_group, untuned=_mean(untuned),
                      in_sample=_mean(in_sample), cross_validated=_mean(held_out) if held_out else None,
                      untuned_objective=objective.value({i: s.score for i, s in untuned.items()}),
                      in_sample_objective=objective.value({i: s.score for i, s in in_sample.items()}),
                      notices=[notice.to_dict() for notice in notices])
        _record(run, spec, tuned, record, untuned, in_sample, held_out, study, time.time() - started)
        for notice in notices:
            _log(run, f"check: {notice.message}")
        if file is not None:
            record["tuned_file"] = str(write_tuned_file(file, tuned, record, run))
            run.write(TUNING_RECORD, record)
    except KeyboardInterrupt as exc:
        run.set_status("interrupted", signal=str(exc) or "SIGINT")
        err.print(f"[yellow]Interrupted.[/] Every finished trial is kept; run the same `vlab tune` again to "
                  f"continue ({run.path}).")
        raise
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return run


def _cross_validate(search: Search, cases: list[Case], groups: list[int], scorer: CaseScorer, trials: int,
                    tick, chooser: "_Chooser") -> tuple[dict[str, VolumeScore], dict[str, Any]]:
    """For each group: tune on the others (chosen by the same rule as the main search), score the chain found
    on it. Needs two groups at least."""
    held_out: dict[str, VolumeScore] = {}
    per_group: dict[str, Any] = {}
    if len(groups) < 2:
        return held_out, per_group
    for group in groups:
        inside = [c.id for c in cases if c.group != group]
        outside = [c.id for c in cases if c.group == group]
        sub = dataclasses.replace(search, name=f"{search.name}-cv{group}", ids=inside)
        study = sub.run(scorer, trials, lambda best: tick(f"cross-validation {group}", best))
        best, _ = chooser.choose(sub, study)
        scores = scorer.score(chain_of(apply_values(search.spec, best)), outside)
        held_out.update(scores)
        per_group[str(group)] = {"volumes": outside, "best": best, "score": _mean(scores)}
    return held_out, per_group


def groups_of(cases: list[Case]) -> list[int]:
    """The groups of the cross-validation: the folds (or pseudo-folds) that held the cases out."""
    return sorted({case.group for case in cases})


class _Chooser:
    """The chain a search ends with: its best trial, or with ``plateau`` the centre of the best neighbourhood.
    Chains scored outside the search (neighbours, profiles) are scored once and kept in trials.json, so a
    continued tune does not score them again."""

    def __init__(self, run: Run, scorer: CaseScorer, radius: float, note=lambda text: None):
        self.run, self.scorer, self.radius, self.note = run, scorer, radius, note
        self.memo: dict[str, dict] = self.run.read(TRIALS_FILE, {}).get("neighbours") or {}  # study -> chain -> scores

    def choose(self, search: Search, study) -> tuple[dict[str, Any], dict[str, Any] | None]:
        best = best_values(study, search.space)  # also: a clear error when every trial was refused
        if not self.radius:
            return best, None
        scored = [(values_of(t.params, search.space), t.value) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE]
        return plateau.choose(search.space, scored, self.radius, lambda values: self.evaluate(search, values))

    def evaluate(self, search: Search, values: dict[str, Any]) -> float | None:
        """The objective of ``values`` on the search's volumes; None when the steps refuse them."""
        memo = self.memo.setdefault(search.name, {})
        key = json.dumps(values, sort_keys=True)
        if key not in memo:
            self.note(f"{search.name}: scoring around the chosen chain ({len(memo) + 1})")
            try:
                scores = self.scorer.score(chain_of(apply_values(search.spec, values)), search.ids)
                memo[key] = {i: s.score for i, s in scores.items()}
            except REFUSED:  # values the steps refuse: no neighbour there
                memo[key] = None
            _keep_in_trials(self.run, self.memo, "neighbours")
            interrupts.check()
        return None if memo[key] is None else search.objective.value(memo[key])


def _notices(search: Search, study, chosen: dict[str, Any], groups: dict[str, str], found: dict, runs_dir: Path) \
        -> list[Notice]:
    """What a careful user would check by eye in the main search (:mod:`vesuvius_lab.core.tuning.notices`)."""
    records = trial_records(study, search.space)

    def accepts(key: str, value: Any) -> bool:  # would the steps take a value beyond the range?
        try:
            steps, threshold = chain_of(apply_values(search.spec, {**chosen, key: value}))
            build_chain(steps, threshold=threshold, runs_dir=runs_dir)
            return True
        except (*REFUSED, ValueError):
            return False

    return all_notices(search.space, chosen, records, found, groups, accepts)


def _record(run: Run, spec: Experiment, tuned: Experiment, record: dict, untuned: dict, in_sample: dict,
            held_out: dict, study, wall_time: float) -> None:
    """scores.json (per volume: held out when there is a cross-validation, else in-sample), trials.json,
    spec.json (the tuned experiment) and summary.json, whose score is the honest one."""
    final = held_out or in_sample
    volumes = [{"id": i, **s.to_dict(), "untuned": untuned[i].score, "in_sample": in_sample[i].score}
               for i, s in final.items()]
    steps = {"untuned": record["untuned"], "in-sample": record["in_sample"]}
    if held_out:
        steps["cross-validated"] = record["cross_validated"]
    run.write("scores.json", {"epoch": None, "mean": mean_scores(list(final.values())), "volumes": volumes,
                              "steps": steps})
    _keep_in_trials(run, trial_records(study, spec.tune), "trials")
    run.write(TUNING_RECORD, record)
    named = tuned.model_copy(update={"name": f"{spec.name}-tuned",
                                     "data": tuned.data.model_copy(update={"folds": None})})
    run.write("spec.json", named.model_dump(mode="json"))
    write_summary(run, named, wall_time=wall_time, parameters=None, epochs_done=None, best_epoch=None,
                  kind="tuned", extra={"trials": len(study.trials), "untuned_score": record["untuned"],
                                       "in_sample_score": record["in_sample"],
                                       "estimate": "cross-validated" if held_out else "in-sample"})
    how = (f"cross-validated {record['cross_validated']:.4f}" if held_out else
           "no cross-validation (one volume)") + f", in-sample {record['in_sample']:.4f}"
    _log(run, f"untuned {record['untuned']:.4f}; tuned: {how}; best {record['best']}")


def write_tuned_file(file: Path, tuned: Experiment, record: dict, run: Run) -> Path:
    """``<stem>.tuned.toml`` beside ``file``: it extends ``file`` with the tuned chain and threshold."""
    target = file.with_name(f"{file.stem}.tuned.toml")
    estimate = f"{record['cross_validated']:.4f}" if record.get("cross_validated") is not None else "n/a"
    lines = [
        f"# Tuned by `vlab tune {file.name}` on {datetime.now():%Y-%m-%d %H:%M}: {record['trials']} trials per search",
        f"# on {len(record['cases'])} out-of-fold volume(s) of {', '.join(Path(s).name for s in record['sources'])}.",
        f"# Cross-validated score {estimate} (untuned {record['untuned']:.4f} on the same volumes); "
        f"in-sample best {record['in_sample']:.4f}.",
        f"# Objective: {record.get('objective', 'mean over volumes')}"
        + (f"; plateau {record['plateau']['radius']:g} (the chosen point's neighbourhood "
           f"{record['plateau']['neighbourhood']:.4f})" if record.get("plateau") else "") + ".",
        f"# The tuning run: {run.path}",
        f'extends = "{file.name}"',
        f"name = {toml_value(tuned.name + '-tuned')}",
        "",
        "[inference]",
        f"threshold = {toml_value(tuned.inference.threshold)}",
    ]
    if tuned.ensemble is not None and tuned.ensemble != load_experiment(file).spec.ensemble:
        ensemble = tuned.ensemble.model_dump(mode="json", exclude_none=True)
        lines += ["", "[ensemble]  # the members of the ensemble run that was tuned"] + [
            f"{key} = {toml_value(value)}" for key, value in ensemble.items()]
    for step in tuned.postprocess:
        lines += ["", "[[postprocess]]", f"plugin = {toml_value(step.plugin)}",
                  f"params = {toml_value(step.params)}"]
    write_text_atomic(target, "\n".join(lines) + "\n")
    load_experiment(target)  # what was written must load as it says
    return target


# --------------------------------------------------------------------------- the target and the run


def _target(target: str, project: Project, overrides: list[str]) -> tuple[Experiment, Path | None, list[Run]]:
    """(resolved spec with its [tune], the experiment file if one was given, the runs to tune on)."""
    path = Path(target)
    if path.suffix == ".toml":  # a file, checked exactly as `vlab validate` checks it
        spec = project.resolve(read_experiment(path, overrides).spec)
        sources = source_runs(spec, project.runs_dir)
        if spec.ensemble is not None and len(sources) == 1:
            # The ensemble run tuned on may have combined other members than the file lists (`vlab ensemble
            # --top N`, --set): the tuned spec and file name what was really combined.
            spec = spec.model_copy(update={"ensemble": read_spec(sources[0]).ensemble})
        return spec, path, sources
    if overrides:
        raise UserError(f"--set {overrides[0]}: a run is tuned with the [tune] table it recorded; --set applies to "
                        "an experiment file. Tune the file instead, or edit its [tune] table.")
    run = resolve_run(target, project.runs_dir)
    spec = read_spec(run)
    return spec, None, [run] if spec.ensemble is not None else source_runs(spec, project.runs_dir)


def tuning_identity(spec: Experiment, sources: list[Run]) -> dict:
    """What makes two tunings the same one (continued, sharing a study): the space, the source runs and how
    a chain is chosen."""
    identity = {"space": _space_record(spec.tune), "sources": [str(run.path) for run in sources]}
    options = spec.tune_options
    if (options.objective, options.plateau) != ("mean", 0):  # how every tuning chose before choices were recorded
        choice = {"objective": options.objective, "plateau": options.plateau}
        if options.objective != "mean":  # only what changes the chain chosen
            choice["group_by"] = options.group_by
        if options.objective == "mean_minus_std":
            choice["k"] = options.k
        identity["choice"] = choice
    return identity


def _space_record(space: dict[str, TuneRange]) -> dict:
    return {key: dimension.model_dump(mode="json", exclude_defaults=True) for key, dimension in space.items()}


def _resumable(runs_dir: Path, name: str, identity: dict, target: str) -> Run | None:
    """The newest killed or interrupted tuning run of the same space and sources, to continue. A run whose
    records are damaged, so that it cannot be told whether to continue it, is refused, never replaced by a
    new run unasked."""
    wanted = json.dumps(identity, sort_keys=True)
    for run in sorted(find_runs(runs_dir), key=lambda r: r.id, reverse=True):
        if run.experiment != name:
            continue
        damaged = {record: reason for record in RECORDS if (reason := run.damaged(record))}
        recorded = run.read(TUNING_RECORD, {})
        same = json.dumps({key: recorded[key] for key in IDENTITY_KEYS if recorded.get(key) is not None},
                          sort_keys=True) == wanted
        state = effective_state(run)
        if damaged and (same or TUNING_RECORD in damaged) and state in (*RESUMABLE, "unknown"):
            record, reason = next(iter(damaged.items()))
            raise UserError(f"{run.path / record}: damaged ({reason}), so vlab tune cannot tell whether to continue "
                            f"the tuning run {run.path}. Start a new tuning run with `vlab tune {target} --force` "
                            "(that folder stays as it is), or remove the folder and run the same command again.")
        if same and state in RESUMABLE:
            _log(run, f"continuing {run.path}")
            return run
    return None


def _own_study(run: Run, name: str, identity: dict, space_keys: list[str], target: str) -> None:
    """Check the run's own study.db before the search continues it; a damaged one is rebuilt from the
    trials the run recorded in trials.json (the damaged file is kept beside it)."""
    database = run.path / STUDY_FILE
    url = f"sqlite:///{database}"
    if not database.exists():
        return
    try:
        check_studies(open_storage(url), url, name, identity, space_keys)
        return
    except DamagedStorage as exc:
        reason = exc.reason
    saved = run.read(TRIALS_FILE, {})
    studies = {name: saved.get("trials") or [], **(saved.get("cross_validation") or {})}
    recorded = sum(len(records) for records in studies.values() if isinstance(records, list))
    if not recorded:
        raise UserError(f"{database}: the study database is damaged ({reason}) and {run.path / TRIALS_FILE} records "
                        f"no trial to rebuild it from. Start a new tuning run with `vlab tune {target} --force` "
                        f"(that folder stays as it is), or remove {run.path} and run the same command again.")
    kept = database.with_name(f"{STUDY_FILE}.damaged")
    database.replace(kept)
    restored = rebuild(url, {study: records for study, records in studies.items() if records}, identity)
    _log(run, f"{database} was damaged ({reason}): rebuilt it from the {restored} trial(s) recorded in "
              f"{TRIALS_FILE}; the damaged file is kept as {kept.name}")


def _keeper(run: Run, main: str, space: dict[str, TuneRange]):
    """After each trial, the study's finished trials into the run's trials.json (the main search under
    "trials", each cross-validation search under "cross_validation"): what rebuilds a damaged study."""

    def keep(study) -> None:
        where = ("trials",) if study.study_name == main else ("cross_validation", study.study_name)
        _keep_in_trials(run, trial_records(study, space), *where)

    return keep


def _keep_in_trials(run: Run, value: Any, *where: str) -> None:
    """``value`` written at ``where`` (keys, outermost first) in trials.json, the rest kept: the main search's
    trials, each cross-validation search's and the plateau's neighbours are written by their own steps."""
    saved = run.read(TRIALS_FILE, {})
    inner = saved
    for key in where[:-1]:
        inner = inner.setdefault(key, {})
    inner[where[-1]] = value
    run.write(TRIALS_FILE, saved)


def _new_run(spec: Experiment, project: Project, device: str) -> Run:
    run = new_run(project.runs_dir, f"{spec.name}-tuned", spec.data.fold)
    run.write("spec.json", spec.model_copy(update={"name": f"{spec.name}-tuned"}).model_dump(mode="json"))
    run.write("env.json", environment(seed=spec.train.seed or 0, world_size=1, device=device, cwd=project.root))
    (run.path / "metrics.jsonl").touch()
    _log(run, f"run {run.path}")
    return run


class _progress:
    """One bar over every trial of every search, with the best score of the current search."""

    def __init__(self, total: int):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), console=err,
                                 transient=True)
        self.task = self.progress.add_task("tuning", total=total, best="—")

    def __enter__(self):
        self.progress.start()
        return self

    def note(self, stage: str) -> None:
        """Say what runs between trials (neighbours, profiles), without advancing the bar."""
        self.progress.update(self.task, description=stage)

    def __call__(self, stage: str, best: float | None) -> None:
        """After each trial, once Optuna has stored it: the safe point where a stop signal is taken."""
        self.progress.update(self.task, advance=1, description=stage, best="—" if best is None else f"{best:.4f}")
        interrupts.check()

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _log(run: Run, message: str) -> None:
    err.print(message, highlight=False, markup=False)
    run.log(message)


def _mean(scores: dict[str, VolumeScore]) -> float:
    return float(np.mean([s.score for s in scores.values()]))
