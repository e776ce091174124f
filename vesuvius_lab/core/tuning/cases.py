"""The volumes a chain is tuned on: out-of-fold probabilities, each with its label and its group.

A *case* is one training volume that the trained model(s) never saw: its float16 surface
probabilities (a checksummed ``.npy``), its label TIFF, and its *group*, the fold that held it out.
Cases come from an experiment's fold runs (each run's validation volumes, predicted once into the
run's probability cache) or from an ensemble run (the volumes it was scored on, combined from its
members' caches and stored in the tuning run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from vesuvius_lab.core.data.array_cache import read_array, write_array
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.console import err
from vesuvius_lab.core.data.dataset import Dataset, open_volume
from vesuvius_lab.core.data.split import make_split
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.ensemble import EnsemblePredictor, read_members
from vesuvius_lab.core.inference.probability_cache import CachedRun, volume_key
from vesuvius_lab.core.inference.run_kinds import check_openable, load_run
from vesuvius_lab.core.runs.folder import Run, effective_state, find_runs, read_spec

#: More groups than this cost more searches than they add to the estimate.
MAX_GROUPS = 5


@dataclass(frozen=True)
class Case:
    id: str
    group: int
    probabilities: str  # path of a float16 (D, H, W) .npy
    label: str  # path of the label TIFF
    scroll: str = ""  # the scroll it comes from (train.csv), "" when unknown

    def to_dict(self) -> dict:
        return asdict(self)


def source_runs(spec: Experiment, runs_dir: Path) -> list[Run]:
    """The runs whose predictions are tuned on: the newest finished run of each fold of a [model]
    experiment, or its newest finished ensemble run."""
    newest: dict[int, Run] = {}
    all_data: list[Run] = []
    for run in sorted(find_runs(runs_dir), key=lambda r: r.id):
        if run.experiment != spec.name or effective_state(run) != "finished":
            continue
        recorded = run.read("spec.json", {})
        if (recorded.get("ensemble") is not None) != (spec.ensemble is not None):
            continue
        fold = (recorded.get("data") or {}).get("fold", 0)
        if fold == "all":  # trained on every volume: none is out-of-fold
            all_data.append(run)
            continue
        newest[0 if spec.ensemble is not None else fold] = run
    if not newest and all_data:
        raise UserError(f'experiment "{spec.name}": its finished runs ({", ".join(r.id for r in all_data)}) trained on '
                        "every volume (data.fold = \"all\"), so none holds a volume out and there is nothing honest to "
                        "validate or tune on. Train cross-validation folds (`vlab run FILE --folds all`) and tune those.")
    if not newest:
        what = "built ensemble run" if spec.ensemble is not None else "trained run"
        how = "vlab ensemble FILE" if spec.ensemble is not None else "vlab run FILE --folds all"
        raise UserError(f'no finished {what} of experiment "{spec.name}" in {runs_dir}. vlab tune tunes the '
                        f"post-processing on the out-of-fold predictions of trained runs: run `{how}` first.")
    return [newest[fold] for fold in sorted(newest)]


def check_sources(runs: list[Run]) -> None:
    """Refuse, once per run and before anything is created or predicted, source runs that cannot be opened
    to predict: a damaged record, a missing or unreadable checkpoint, an ensemble without its members."""
    problems = []
    for run in runs:
        try:
            check_openable(run)
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("vlab tune predicts the out-of-fold volumes with its source runs, and "
                        f"{'this one' if len(problems) == 1 else 'these'} cannot be used:\n  " + "\n  ".join(problems))


def gather_cases(runs: list[Run], folder: Path, cache_dir: Path, device: str) -> list[Case]:
    """Every out-of-fold volume of ``runs`` as a case; what is not predicted yet is predicted once."""
    with Progress(console=err, transient=True) as progress:
        cases = []
        for run in runs:
            spec = read_spec(run)
            gather = _ensemble_cases if spec.ensemble is not None else _fold_run_cases
            cases += gather(run, spec, folder, cache_dir, device, progress)
    if not cases:
        raise UserError(f"{', '.join(str(r.path) for r in runs)}: no out-of-fold volume to tune on (a run "
                        "trained on every volume has none). Train folds that hold volumes out.")
    return regroup(cases)


def _fold_run_cases(run: Run, spec: Experiment, folder: Path, cache_dir: Path, device: str,
                    progress: Progress) -> list[Case]:
    split = make_split(spec)
    cached = CachedRun(run, spec, device=device, load=load_run)
    task = progress.add_task(f"{run.experiment}/{run.id}: out-of-fold probabilities", total=len(split.val_ids))
    cases = []
    for volume_id in split.val_ids:
        image = open_volume(split.dataset.image_path(volume_id), cache_dir)
        key = volume_key(image)
        cached.get(image, key, volume_id)
        cases.append(Case(volume_id, spec.data.fold, str(cached.path(key)), str(split.dataset.label_path(volume_id)),
                          split.dataset.scroll_of(volume_id)))
        progress.advance(task)
    cached.release()
    return cases


def _ensemble_cases(run: Run, spec: Experiment, folder: Path, cache_dir: Path, device: str,
                    progress: Progress) -> list[Case]:
    members, scored = read_members(run)
    predictor = EnsemblePredictor(members, spec.ensemble.combine, load=load_run, device=device)
    dataset = Dataset.open(Path(spec.data.root))
    task = progress.add_task(f"{run.experiment}/{run.id}: combined probabilities", total=len(scored))
    cases = []
    for key, volume_id in scored.items():
        entry = folder / "cases" / f"{volume_id}.npy"
        if read_array(entry) is None:
            image = open_volume(dataset.image_path(volume_id), cache_dir)
            write_array(entry, predictor.probabilities(image, volume_id, key).astype(np.float16))
        holders = [r.spec.data.fold for r in members[0].runs_for(volume_id) if volume_id in r.holds_out]
        cases.append(Case(volume_id, holders[0] if len(holders) == 1 else 0, str(entry),
                          str(dataset.label_path(volume_id)), dataset.scroll_of(volume_id)))
        progress.advance(task)
    return cases


def regroup(cases: list[Case]) -> list[Case]:
    """Cases held out by one fold only are split into pseudo-folds (round robin, at most MAX_GROUPS),
    so that the cross-validated estimate always has volumes to tune on and volumes to score."""
    if len({case.group for case in cases}) >= 2 or len(cases) < 2:
        return cases
    groups = min(MAX_GROUPS, 3, len(cases))
    ordered = sorted(cases, key=lambda case: case.id)
    return [dataclasses.replace(c, group=index % groups) for index, c in enumerate(ordered)]
