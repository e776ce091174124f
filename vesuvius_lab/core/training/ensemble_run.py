"""Building an ensemble run: resolve the members, predict what their caches lack, combine, score, record.

What an ensemble is, how its members are combined and why it is scored out-of-fold is told in
:mod:`vesuvius_lab.core.inference.ensemble`. Building one is this stage's job because, like
training, it turns an experiment file into a scored run (the same validation and summary).

The record: ``runs/<name>/<run-id>/`` like any run: spec.json (with the ``ensemble`` table),
env.json, status.json, scores.json (per volume and per post-processing step), summary.json (the
leaderboard's keys), an empty metrics.jsonl, and ``members.json``: the exact runs combined, the
volumes each holds out, and the keys of the volumes scored.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.progress import Progress

from vesuvius_lab.core import interrupts
from vesuvius_lab.core.config.experiment import LoadedExperiment
from vesuvius_lab.core.config.project import Project
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.console import err
from vesuvius_lab.core.data.dataset import Dataset, open_volume
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.ensemble import MEMBERS_FILE, EnsemblePredictor
from vesuvius_lab.core.inference.ensemble_members import Member, members_record, resolve_members, validation_volumes
from vesuvius_lab.core.inference.postprocess import build_chain
from vesuvius_lab.core.inference.probability_cache import volume_key
from vesuvius_lab.core.inference.run_kinds import load_run
from vesuvius_lab.core.runs.folder import Run, environment, new_run
from vesuvius_lab.core.runs.lock import RunLock
from vesuvius_lab.core.runs.summary import write_summary
from vesuvius_lab.core.training.validation import ValidationResult, validate


@interrupts.stop_signals(at="after this volume")
def build_ensemble(loaded: LoadedExperiment, project: Project, *, device: str = "cpu") -> Run:
    """Resolve the members, predict what the cache lacks, combine, score, record; return the run."""
    spec = _resolved(loaded, project)
    members = resolve_members(spec.ensemble, project.runs_dir, Path(spec.data.root))
    dataset = Dataset.open(Path(spec.data.root))
    volumes = validation_volumes(members, dataset.ids)
    images = {v: open_volume(dataset.image_path(v), project.cache_dir) for v in volumes}
    keys = {v: volume_key(images[v]) for v in volumes}
    run = _start_run(spec, project, device, members, keys)
    lock = RunLock(run).acquire()
    started = time.time()
    try:
        predictor = EnsemblePredictor(members, spec.ensemble.combine, load=load_run, device=device)
        if volumes:
            _predict_missing(predictor, images, keys, run)
            result = _score(predictor, spec, dataset, images, keys, project, device)
            run.write("scores.json", {"epoch": None, **result.to_dict()})
            _log(run, f"validation score {result.score:.4f} on {len(volumes)} out-of-fold volume(s)")
        elif all_data := [m.label for m in members if any(r.spec.data.fold == "all" for r in m.runs)]:
            _log(run, f"member(s) {', '.join(all_data)} trained on every volume (fold all), so no volume is out-of-fold "
                      "for all members: the ensemble is not validated; it predicts test volumes (`vlab submit`).")
        else:
            _log(run, "warning: no training volume is held out by every member (their validation folds do not "
                      "overlap), so the ensemble has no honest validation score. Use members trained with the "
                      'same folds and folds = "all".')
        write_summary(run, spec, wall_time=time.time() - started, parameters=_parameters(members),
                      epochs_done=None, best_epoch=None, kind="ensemble")
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        lock.release()
    return run


def _resolved(loaded: LoadedExperiment, project: Project) -> Experiment:
    if loaded.spec.ensemble is None:
        raise UserError(f"{loaded.file}: has a [model] table, not an [ensemble] one. Train it with "
                        f"`vlab train {loaded.file}`; `vlab ensemble` combines runs that are trained already.")
    spec = project.resolve(loaded.spec)
    # An ensemble has no folds of its own (its members' folds decide what it is scored on), so the
    # leaderboard must not count it as one fold of several.
    return spec.model_copy(update={"data": spec.data.model_copy(update={"folds": None})})


def _start_run(spec: Experiment, project: Project, device: str, members: list[Member], keys: dict[str, str]) -> Run:
    run = new_run(project.runs_dir, spec.name, spec.data.fold)
    run.write("spec.json", spec.model_dump(mode="json"))
    run.write("env.json", environment(seed=spec.train.seed, world_size=1, device=device, cwd=project.root))
    run.write(MEMBERS_FILE, {"combine": spec.ensemble.combine, "members": members_record(members, project.runs_dir),
                             "volumes": keys})
    (run.path / "metrics.jsonl").touch()
    run.set_status("running")
    _log(run, f"run {run.path}")
    for member in members:
        folds = ", ".join(str(r.spec.data.fold) for r in member.runs)
        _log(run, f"member {member.label} (weight {member.weight:g}): {len(member.runs)} run(s), fold(s) {folds}")
    return run


def _predict_missing(predictor: EnsemblePredictor, images: dict, keys: dict[str, str], run: Run) -> None:
    """Predict every (member run, volume) the cache lacks, one member run at a time (one model in memory)."""
    todo: dict[Path, list[str]] = {}
    for volume_id in images:
        for _, cached in predictor.runs_for(volume_id):
            if not cached.has(keys[volume_id]):
                todo.setdefault(cached.run.path, []).append(volume_id)
    total = sum(map(len, todo.values()))
    if not total:
        _log(run, "every member prediction is cached")
        return
    _log(run, f"predicting {total} member volume(s) that are not cached")
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("member predictions", total=total)
        for path, volume_ids in todo.items():
            cached = predictor.cached[path]
            for volume_id in volume_ids:
                interrupts.check()  # between volumes: each cached prediction is whole
                progress.update(task, description=f"{cached.label}: {volume_id}")
                cached.get(images[volume_id], keys[volume_id], volume_id)
                progress.advance(task)
            cached.release()


def _score(predictor: EnsemblePredictor, spec: Experiment, dataset: Dataset, images: dict, keys: dict[str, str],
           project: Project, device: str) -> ValidationResult:
    """Combine each volume's member probabilities and score them after every post-processing step."""
    chain = build_chain(spec.postprocess, threshold=spec.inference.threshold, device=device,
                        runs_dir=project.runs_dir)

    def cases():
        for volume_id, image in images.items():
            interrupts.check()
            probabilities = predictor.probabilities(image, volume_id, keys[volume_id])
            yield volume_id, probabilities, open_volume(dataset.label_path(volume_id), project.cache_dir)

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("scoring the ensemble", total=len(images))
        # The cases carry the combined probabilities already, so "predicting" them is the identity.
        return validate(lambda probabilities: probabilities, cases(), chain, ignore_label=spec.data.ignore_label,
                        on_volume=lambda volume_id: progress.advance(task))


def _parameters(members: list[Member]) -> int | None:
    """The parameters of every member run together (what predicting with the ensemble costs), if all are known."""
    counts = [(r.run.read("summary.json") or {}).get("parameters") for m in members for r in m.runs]
    return sum(counts) if counts and all(isinstance(c, int) for c in counts) else None


def _log(run: Run, message: str) -> None:
    err.print(message, highlight=False)
    run.log(message)
