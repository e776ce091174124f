"""Opening any run to predict with it: one table of run kinds, each with its opener.

Every finished run is one of these kinds, told by its spec and its model plugin:

``model``
    a ``torch.nn.Module`` trained by the core loop: its checkpoint is loaded into the network the
    plugin builds, and volumes are predicted by the sliding-window engine with the run's
    ``[inference]`` (blending, TTA, axes).
``self_training``
    a backend that trains and predicts by itself (a :class:`~vesuvius_lab.core.contract.backend.SelfTrainingModel`,
    e.g. nnU-Net): it loads its own artefacts from the run folder and returns probabilities.
``ensemble``
    an ``[ensemble]`` run: its member runs (of any kind) are opened on demand through this same
    table, and their cached probabilities combined.
``tuned``
    a ``vlab tune`` run: the runs it was tuned on (an ensemble run, or the fold runs of an
    experiment, averaged), opened through this same table, with the tuned chain.

Whatever the kind, :func:`load_run` returns a :class:`RunPredictor`: probabilities per volume,
probabilities of a box of a volume of any size (block-wise prediction, exact; every kind but a
self-training backend without a ``window_model``) and the run's post-processing chain. ``vlab predict``, ``vlab submit``, ``vlab report``, ensembles and
post-processing steps that use a run all open it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zipfile

import numpy as np

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.experiment import load_record, parse_override
from vesuvius_lab.core.runs import checkpoint
from vesuvius_lab.core.contract.backend import SelfTrainingModel
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.blocks import Box, Reader, predict_block
from vesuvius_lab.core.inference.engine import predict_volume
from vesuvius_lab.core.inference.ensemble import MEMBERS_FILE, EnsemblePredictor, combine, read_members
from vesuvius_lab.core.inference.postprocess import Chain, build_chain
from vesuvius_lab.core.runs.folder import TUNING_RECORD, Run, open_run, read_spec
from vesuvius_lab.core.runs.records import resolve_run

#: uint8 CT volume (D, H, W) -> float32 surface probabilities (D, H, W)
Probabilities = Callable[[np.ndarray], np.ndarray]
#: (a volume reader, a box of it) -> float32 surface probabilities of the box, exactly as the whole volume's
#: prediction has them there (:mod:`vesuvius_lab.core.inference.blocks`)
BlockProbabilities = Callable[[Reader, Box], np.ndarray]


@dataclass(frozen=True)
class Opened:
    """What an opener returns: probabilities of a whole volume, and of a box of any volume (None when the
    kind cannot predict a box exactly)."""

    probabilities: Probabilities
    blocks: BlockProbabilities | None = None


@dataclass
class RunPredictor:
    """A run ready to predict: ``probabilities(volume)`` and the run's post-processing ``chain``."""

    run: Run
    spec: Experiment
    probabilities: Probabilities
    chain: Chain
    kind: str = "model"
    blocks: BlockProbabilities | None = None  # see :data:`BlockProbabilities`

    def mask(self, volume: np.ndarray) -> np.ndarray:
        return self.chain.apply(self.probabilities(volume))


@dataclass(frozen=True)
class Opening:
    """What an opener gets: the run, its spec (overrides applied) and how to predict."""

    run: Run
    spec: Experiment
    device: str
    overrides: dict
    checkpoint_name: str


def build_model(spec: Experiment) -> Any:
    """The object a model plugin builds for ``spec``: a torch module or a self-training backend."""
    return registry.build("models", spec.model.plugin, spec.model.params, window=spec.data.window,
                          in_channels=1, out_channels=1, inference=spec.inference)


def run_kind(spec: Experiment, model: Any = None) -> str:
    """The kind of a run of ``spec`` whose model plugin built ``model`` (None for an ensemble)."""
    if spec.ensemble is not None:
        return "ensemble"
    return "self_training" if isinstance(model, SelfTrainingModel) else "model"


#: The checkpoints of a run trained by the core loop that prediction can use (``--checkpoint``). A run
#: predicts with the one asked for, never quietly with the other: a missing or unreadable one is an error
#: that names the alternative.
CHECKPOINTS = ("best", "last")


def _unusable_checkpoint(run: Run, name: str, reason: str) -> UserError:
    """A checkpoint that cannot be used, with the other one named when the run has it."""
    path = run.checkpoints / f"{name}.pt"
    others = [other for other in CHECKPOINTS if other != name and (run.checkpoints / f"{other}.pt").is_file()]
    if others:
        fix = (f"Predict with the {others[0]} checkpoint instead: `--checkpoint {others[0]}` of vlab predict or "
               f"vlab submit ({run.checkpoints / f'{others[0]}.pt'}), or train the run again.")
    else:
        fix = "The run has no other checkpoint: train it again."
    return UserError(f"{path}: {reason}, so run {run.path} cannot predict with its {name} checkpoint. {fix}")


def checkpoint_path(run: Run, name: str) -> Path:
    """The checkpoint file ``name`` of a run, present and in torch's format (a cheap check of its header)."""
    if name not in CHECKPOINTS:
        raise UserError(f"--checkpoint {name}: give one of {', '.join(CHECKPOINTS)}.")
    path = run.checkpoints / f"{name}.pt"
    if not path.is_file():
        raise _unusable_checkpoint(run, name, "missing")
    try:
        readable = zipfile.is_zipfile(path)  # torch.save writes a zip archive; a damaged one is not
    except OSError as exc:
        raise _unusable_checkpoint(run, name, f"cannot be read ({exc.strerror or exc})") from None
    if not readable:
        raise _unusable_checkpoint(run, name, "not a readable vesuvius-lab checkpoint (not a torch archive: damaged, "
                                              "truncated or another kind of file)")
    return path


def _open_module(opening: Opening, model: Any) -> Probabilities:
    run, spec = opening.run, opening.spec
    path = checkpoint_path(run, opening.checkpoint_name)
    try:
        state = checkpoint.load(path)
    except UserError as exc:
        raise _unusable_checkpoint(run, opening.checkpoint_name, f"unreadable ({exc})") from None
    checkpoint.load_model_state(model, state, path, spec.model.plugin, spec.model.params)
    model.to(opening.device).eval()

    def probabilities(volume: np.ndarray) -> np.ndarray:
        return predict_volume(volume, model, spec.inference, window=spec.inference_window, device=opening.device)

    def blocks(reader: Reader, box: Box) -> np.ndarray:
        return predict_block(reader, box, model, spec.inference, window=spec.inference_window, device=opening.device)

    return Opened(probabilities, blocks)


def _open_self_training(opening: Opening, model: SelfTrainingModel) -> Probabilities:
    if opening.checkpoint_name != "best":  # asked for explicitly: never quietly ignored
        raise UserError(f"--checkpoint {opening.checkpoint_name}: run {opening.run.path} was trained by its model "
                        f"plugin ({opening.spec.model.plugin}), which chooses its own checkpoint (e.g. nnunet's "
                        "params.checkpoint); --checkpoint applies to runs trained by the core loop.")
    model.load(opening.run.path, opening.device)
    windowed = getattr(model, "window_model", None)  # optional: the backend's network as a window predictor
    if windowed is None:
        return Opened(model.predict_probabilities)
    network, inference = windowed()

    def blocks(reader: Reader, box: Box) -> np.ndarray:
        return predict_block(reader, box, network, inference, device=opening.device)

    return Opened(model.predict_probabilities, blocks)


def tuning_sources(run: Run) -> list[Path]:
    """The runs a tuning run was tuned on. A recorded path that is gone (the runs folder was moved or copied,
    e.g. into an offline bundle) is looked up as ``<experiment>/<run id>`` beside the tuning run."""
    found = []
    for recorded in run.read(TUNING_RECORD, {}).get("sources", []):
        path = Path(recorded)
        beside = run.path.parent.parent / path.parent.name / path.name
        found.append(path if (path / "spec.json").is_file() or not (beside / "spec.json").is_file() else beside)
    return found


def referenced_runs(run: Run) -> list[Path]:
    """The runs ``run`` predicts through, directly: a tuning run's sources, an ensemble's member runs and the
    runs its post-processing steps name (a param called ``run``, e.g. the hole stitcher's)."""
    paths = tuning_sources(run) if (run.path / TUNING_RECORD).is_file() else []
    if (run.path / MEMBERS_FILE).is_file():
        members, _ = read_members(run)
        paths += [member_run.run.path for member in members for member_run in member.runs]
    for step in read_spec(run).postprocess:
        named = step.params.get("run") if isinstance(step.params, dict) else None
        if isinstance(named, str):
            paths.append(resolve_run(named, run.path.parent.parent).path)
    return list(dict.fromkeys(Path(path).resolve() for path in paths))


def _open_tuned(opening: Opening, _model: None) -> Probabilities:
    sources = [load_run(path, device=opening.device, overrides=opening.overrides or None,
                        checkpoint_name=opening.checkpoint_name) for path in tuning_sources(opening.run)]
    if not sources:
        raise UserError(f"{opening.run.path}: a tuning run without its source runs in {TUNING_RECORD}; tune again.")

    def probabilities(volume: np.ndarray) -> np.ndarray:
        total = sources[0].probabilities(volume).astype(np.float32)
        for source in sources[1:]:
            total += source.probabilities(volume)
        return total / len(sources)

    def blocks(reader: Reader, box: Box) -> np.ndarray:
        total = sources[0].blocks(reader, box).astype(np.float32)
        for source in sources[1:]:
            total += source.blocks(reader, box)
        return total / len(sources)

    return Opened(probabilities, blocks if all(source.blocks for source in sources) else None)


def _open_ensemble(opening: Opening, _model: None) -> Probabilities:
    members, scored_ids = read_members(opening.run)
    predictor = EnsemblePredictor(members, opening.spec.ensemble.combine, load=load_run, device=opening.device,
                                  overrides=opening.overrides, checkpoint_name=opening.checkpoint_name)
    predictor.scored_ids = scored_ids
    opened: dict[Path, RunPredictor] = {}  # member runs opened for boxes, once each

    def member_blocks(path: Path) -> BlockProbabilities:
        if path not in opened:
            opened[path] = load_run(path, device=opening.device, overrides=opening.overrides or None,
                                    checkpoint_name=opening.checkpoint_name)
        if opened[path].blocks is None:
            raise UserError(f"{path}: this member run cannot predict a block of a large volume exactly "
                            f"({opened[path].kind} run); predict whole volumes with it, or leave it out.")
        return opened[path].blocks

    def blocks(reader: Reader, box: Box) -> np.ndarray:
        return combine(((weight, member_blocks(cached.run.path)(reader, box))
                        for weight, cached in predictor.runs_for(None)), opening.spec.ensemble.combine)

    return Opened(lambda volume: predictor.probabilities(volume), blocks)


#: kind -> opener(opening, built model) -> the run's probabilities per volume and per box
RUN_KINDS: dict[str, Callable[[Opening, Any], Opened]] = {
    "model": _open_module,
    "self_training": _open_self_training,
    "ensemble": _open_ensemble,
    "tuned": _open_tuned,
}


def load_run(path: Path, *, device: str = "cpu", overrides: dict | None = None,
             checkpoint_name: str = "best") -> RunPredictor:
    """Open a run of any kind to predict with it; ``overrides`` replace ``[inference]`` keys (e.g. tta,
    overlap; for an ensemble, its members')."""
    run = open_run(path)
    spec = read_spec(run)
    if overrides:
        spec = spec.model_copy(update={"inference": spec.inference.model_copy(update=overrides)})
    if (run.path / TUNING_RECORD).is_file():
        kind, model = "tuned", None
    else:
        model = None if spec.ensemble is not None else build_model(spec)
        kind = run_kind(spec, model)
    opening = Opening(run, spec, device, dict(overrides or {}), checkpoint_name)
    opened = RUN_KINDS[kind](opening, model)
    chain = build_chain(spec.postprocess, threshold=spec.inference.threshold, device=device,
                        runs_dir=run.path.parent.parent)
    return RunPredictor(run, spec, opened.probabilities, chain, kind, opened.blocks)


def check_openable(run: Run, checkpoint_name: str = "best") -> None:
    """The cheap checks of :func:`load_run`, made before any work starts: the run's spec, the checkpoint
    it predicts with (present, in torch's format), an ensemble's members and a tuning run's sources."""
    run = open_run(run.path)
    spec = read_spec(run)
    if (run.path / TUNING_RECORD).is_file():
        for path in tuning_sources(run):
            check_openable(Run(path), checkpoint_name)
    elif spec.ensemble is not None:
        members, _ = read_members(run)
        for member in members:
            for member_run in member.runs:
                check_openable(member_run.run, checkpoint_name)
    elif any((run.checkpoints / f"{name}.pt").exists() for name in CHECKPOINTS):  # trained by the core loop
        checkpoint_path(run, checkpoint_name)


def inference_overrides(path: Path, texts: list[str]) -> dict:
    """``--set`` texts of ``vlab predict`` / ``vlab submit`` (``[inference]`` keys, with or without the
    ``inference.`` prefix) checked against the run's spec exactly as ``vlab validate`` checks an experiment
    file's; the validated values by key."""
    if not texts:
        return {}
    run = open_run(path)
    spec = load_record(run.path / "spec.json", read_spec(run).model_dump(mode="json"), texts, prefix=("inference",))
    keys = [parse_override(text)[0] for text in texts]
    return {key[-1]: getattr(spec.inference, key[-1]) for key in keys}
