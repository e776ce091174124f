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

Whatever the kind, :func:`load_run` returns a :class:`RunPredictor`: probabilities per volume and
the run's post-processing chain. ``vlab predict``, ``vlab submit``, ``vlab report``, ensembles and
post-processing steps that use a run all open it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vesuvius_lab.core import registry
from vesuvius_lab.core.runs import checkpoint
from vesuvius_lab.core.contract.backend import SelfTrainingModel
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.engine import predict_volume
from vesuvius_lab.core.inference.ensemble import EnsemblePredictor, read_members
from vesuvius_lab.core.inference.postprocess import Chain, build_chain
from vesuvius_lab.core.runs.folder import TUNING_RECORD, Run, open_run, read_spec

#: uint8 CT volume (D, H, W) -> float32 surface probabilities (D, H, W)
Probabilities = Callable[[np.ndarray], np.ndarray]


@dataclass
class RunPredictor:
    """A run ready to predict: ``probabilities(volume)`` and the run's post-processing ``chain``."""

    run: Run
    spec: Experiment
    probabilities: Probabilities
    chain: Chain
    kind: str = "model"

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


def _open_module(opening: Opening, model: Any) -> Probabilities:
    run, spec = opening.run, opening.spec
    path = run.checkpoints / f"{opening.checkpoint_name}.pt"
    if not path.is_file() and opening.checkpoint_name == "best":
        path = run.checkpoints / "last.pt"
    state = checkpoint.load(path)
    checkpoint.load_model_state(model, state, path, spec.model.plugin, spec.model.params)
    model.to(opening.device).eval()

    def probabilities(volume: np.ndarray) -> np.ndarray:
        return predict_volume(volume, model, spec.inference, window=spec.inference_window, device=opening.device)

    return probabilities


def _open_self_training(opening: Opening, model: SelfTrainingModel) -> Probabilities:
    model.load(opening.run.path, opening.device)
    return model.predict_probabilities


def _open_tuned(opening: Opening, _model: None) -> Probabilities:
    sources = [load_run(Path(path), device=opening.device, overrides=opening.overrides or None,
                        checkpoint_name=opening.checkpoint_name)
               for path in opening.run.read(TUNING_RECORD, {}).get("sources", [])]
    if not sources:
        raise UserError(f"{opening.run.path}: a tuning run without its source runs in {TUNING_RECORD}; tune again.")

    def probabilities(volume: np.ndarray) -> np.ndarray:
        total = sources[0].probabilities(volume).astype(np.float32)
        for source in sources[1:]:
            total += source.probabilities(volume)
        return total / len(sources)

    return probabilities


def _open_ensemble(opening: Opening, _model: None) -> Probabilities:
    members, scored_ids = read_members(opening.run)
    predictor = EnsemblePredictor(members, opening.spec.ensemble.combine, load=load_run, device=opening.device,
                                  overrides=opening.overrides, checkpoint_name=opening.checkpoint_name)
    predictor.scored_ids = scored_ids
    return lambda volume: predictor.probabilities(volume)


#: kind -> opener(opening, built model) -> the run's probabilities per volume
RUN_KINDS: dict[str, Callable[[Opening, Any], Probabilities]] = {
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
    probabilities = RUN_KINDS[kind](opening, model)
    chain = build_chain(spec.postprocess, threshold=spec.inference.threshold, device=device,
                        runs_dir=run.path.parent.parent)
    return RunPredictor(run, spec, probabilities, chain, kind)
