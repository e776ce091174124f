"""Ensembles: the surface probabilities of several trained runs combined, scored and recorded like a run.

An experiment file with an ``[ensemble]`` table instead of ``[model]``::

    name = "quick-ensemble"
    [ensemble]
    members = [
      { experiment = "quick-unet25d", folds = "all" },    # every fold run of an experiment
      "runs/quick-monai-unet/fold0-20250101-120000",       # or one run directory
    ]
    weights = [2, 1]        # optional, one positive weight per member
    combine = "weighted"    # "mean" (default), "weighted", or "logit_mean"
    [inference]
    threshold = 0.5         # applied to the combined probabilities, then the [[postprocess]] chain

``vlab ensemble FILE`` builds it: :func:`build_ensemble`. Any run that ``load_run`` opens can be a
member, whatever its backend (torch models, nnU-Net).

Honest validation: out-of-fold
------------------------------
A fold run never trained on the volumes of its validation fold. For each volume, a member
contributes the predictions of its runs that held that volume out: with ``folds = "all"``, the one
fold run whose validation fold contains it. The ensemble is scored on the training volumes that
every member holds out, so no prediction that is scored comes from a model trained on that
volume. Members trained with the same folds (same ``data.folds`` and ``group_by``) and
``folds = "all"`` give a score over every training volume. For any other volume (test volumes,
``vlab predict``/``vlab submit``), a member is the average of all its runs, i.e. all its folds.
Predicting a volume the ensemble was scored on gives its out-of-fold prediction again.

Combining
---------
For one volume, member m with weight w_m (1 without weights) and the runs R_m that count::

    mean, weighted:  p = sum_m w_m * mean_{r in R_m} p_r / sum_m w_m
    logit_mean:      p = sigmoid(sum_m w_m * mean_{r in R_m} logit(p_r) / sum_m w_m)

It streams, one member run at a time, slab by slab of its cached float16 probabilities, into a
float32 running sum: memory holds the sum plus the member run being added.

Each member run predicts a volume once: :mod:`vesuvius_lab.core.probability_cache` keeps its
probabilities, so re-weighting or adding a member does not predict the others again.

The record
----------
``runs/<name>/<run-id>/`` like any run: spec.json (with the ``ensemble`` table), env.json,
status.json, scores.json (per volume and per post-processing step), summary.json (the
leaderboard's keys), an empty metrics.jsonl, and ``members.json``: the exact runs combined, the
volumes each holds out, and the keys of the volumes scored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from vesuvius_lab.core.console import err
from vesuvius_lab.core.data import Dataset, open_volume
from vesuvius_lab.core.ensemble_members import (Member, members_from_record, members_record, resolve_members,
                                                validation_volumes)
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.experiment import LoadedExperiment
from vesuvius_lab.core.postprocess import build_chain
from vesuvius_lab.core.probability_cache import CachedRun, volume_key
from vesuvius_lab.core.project import Project
from vesuvius_lab.core.runs import Run, environment, new_run
from vesuvius_lab.core.spec import Combine, Experiment
from vesuvius_lab.core.validation import ValidationResult, validate

MEMBERS_FILE = "members.json"
#: Probabilities are clipped to [EPS, 1 - EPS] before the logit, so 0 and 1 stay finite.
EPS = 1e-6


# --------------------------------------------------------------------------- the arithmetic


def combine(contributions: Iterable[tuple[float, np.ndarray]], mode: Combine, *, slab: int = 8) -> np.ndarray:
    """The weighted mean of probabilities (or of their logits, then a sigmoid), float32 (D, H, W).

    ``contributions`` yields ``(weight, probabilities)`` one at a time; each is added slab by slab
    into a float32 running sum, so only the sum and the array being added are ever in memory.
    """
    running, total = None, 0.0
    for weight, probabilities in contributions:
        if running is None:
            running = np.zeros(probabilities.shape, np.float32)
        elif probabilities.shape != running.shape:
            raise ValueError(f"cannot combine probabilities of shapes {probabilities.shape} and {running.shape}")
        for start in range(0, running.shape[0], slab):
            part = probabilities[start:start + slab].astype(np.float32)  # a copy: the input stays as it is
            if mode == "logit_mean":
                part = logit(part)
            part *= np.float32(weight)
            running[start:start + slab] += part
        total += weight
    if running is None:
        raise ValueError("an ensemble needs at least one member")
    running /= np.float32(total)
    return sigmoid_(running) if mode == "logit_mean" else running


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid_(x: np.ndarray) -> np.ndarray:
    """Sigmoid in place."""
    with np.errstate(over="ignore"):
        np.negative(x, out=x)
        np.exp(x, out=x)
    x += 1
    return np.reciprocal(x, out=x)


# --------------------------------------------------------------------------- predicting


class EnsemblePredictor:
    """The combined probabilities of a volume, each member run's read from its cache or predicted once."""

    def __init__(self, members: list[Member], mode: Combine, *, device: str = "cpu",
                 overrides: dict[str, Any] | None = None, checkpoint_name: str = "best"):
        self.members, self.mode = members, mode
        self.cached = {r.run.path: CachedRun(r.run, r.spec, overrides={**m.inference, **(overrides or {})},
                                             device=device, checkpoint_name=checkpoint_name,
                                             label=f"{m.label} ({r.run.experiment}/{r.run.id})")
                       for m in members for r in m.runs}
        self.scored_ids: dict[str, str] = {}  # volume key -> id, for the volumes the ensemble was scored on

    def runs_for(self, volume_id: str | None) -> Iterator[tuple[float, CachedRun]]:
        """(weight, run) of every member run that counts for the volume; weights sum to each member's."""
        for member in self.members:
            runs = member.runs_for(volume_id)
            for run in runs:
                yield member.weight / len(runs), self.cached[run.run.path]

    def probabilities(self, volume: np.ndarray, volume_id: str | None = None, key: str | None = None) -> np.ndarray:
        key = key or volume_key(volume)
        volume_id = volume_id or self.scored_ids.get(key)
        shown = volume_id or "the input volume"
        return combine(((weight, cached.get(volume, key, shown)) for weight, cached in self.runs_for(volume_id)),
                       self.mode)

    @property
    def predictions(self) -> int:
        """Member predictions made (not read from the cache) by this object."""
        return sum(cached.predictions for cached in self.cached.values())


def load_ensemble(run: Run, spec: Experiment, *, device: str = "cpu", overrides: dict | None = None,
                  checkpoint_name: str = "best"):
    """A :class:`~vesuvius_lab.core.predict.RunPredictor` for an ensemble run (``load_run`` calls this)."""
    from vesuvius_lab.core.predict import RunPredictor

    record = run.read(MEMBERS_FILE)
    if not isinstance(record, dict) or not record.get("members"):
        raise UserError(f"{run.path}: an ensemble run without a readable {MEMBERS_FILE} (it was interrupted "
                        "before it started). Build it again with `vlab ensemble FILE`.")
    members = members_from_record(record["members"], run.path.parent.parent, run)
    predictor = EnsemblePredictor(members, spec.ensemble.combine, device=device, overrides=overrides,
                                  checkpoint_name=checkpoint_name)
    predictor.scored_ids = {key: volume_id for volume_id, key in (record.get("volumes") or {}).items()}
    chain = build_chain(spec.postprocess, threshold=spec.inference.threshold, device=device,
                        runs_dir=run.path.parent.parent)
    return RunPredictor(run, spec, lambda volume: predictor.probabilities(volume), chain)


# --------------------------------------------------------------------------- building


def build_ensemble(loaded: LoadedExperiment, project: Project, *, device: str = "cpu") -> Run:
    """Resolve the members, predict what the cache lacks, combine, score, record; return the run."""
    spec = _resolved(loaded, project)
    members = resolve_members(spec.ensemble, project.runs_dir, Path(spec.data.root))
    dataset = Dataset.open(Path(spec.data.root))
    volumes = validation_volumes(members, dataset.ids)
    images = {v: open_volume(dataset.image_path(v), project.cache_dir) for v in volumes}
    keys = {v: volume_key(images[v]) for v in volumes}
    run = _start_run(spec, project, device, members, keys)
    started = time.time()
    try:
        predictor = EnsemblePredictor(members, spec.ensemble.combine, device=device)
        if volumes:
            _predict_missing(predictor, images, keys, run)
            result = _score(predictor, spec, dataset, images, keys, project, device)
            run.write("scores.json", {"epoch": None, **result.to_dict()})
            _log(run, f"validation score {result.score:.4f} on {len(volumes)} out-of-fold volume(s)")
        else:
            _log(run, "warning: no training volume is held out by every member (their validation folds do not "
                      "overlap), so the ensemble has no honest validation score. Use members trained with the "
                      'same folds and folds = "all".')
        from vesuvius_lab.core.train import write_summary

        write_summary(run, spec, wall_time=time.time() - started, parameters=_parameters(members),
                      epochs_done=None, best_epoch=None)
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
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
    from rich.progress import Progress

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("member predictions", total=total)
        for path, volume_ids in todo.items():
            cached = predictor.cached[path]
            for volume_id in volume_ids:
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
            probabilities = predictor.probabilities(image, volume_id, keys[volume_id])
            yield volume_id, probabilities, open_volume(dataset.label_path(volume_id), project.cache_dir)

    from rich.progress import Progress

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
