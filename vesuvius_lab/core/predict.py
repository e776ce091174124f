"""Predicting with a trained run: volumes to probabilities, masks and the competition's submission zip."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from vesuvius_lab.core import checkpoint, registry
from vesuvius_lab.core.backend import SelfTrainingModel
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import atomic_path
from vesuvius_lab.core.postprocess import Chain, build_chain
from vesuvius_lab.core.runs import Run, open_run
from vesuvius_lab.core.spec import Experiment
from vesuvius_lab.core.tiff import read_volume, write_volume


@dataclass
class RunPredictor:
    """A run ready to predict: ``probabilities(volume)`` and the run's post-processing ``chain``."""

    run: Run
    spec: Experiment
    probabilities: Callable[[np.ndarray], np.ndarray]
    chain: Chain

    def mask(self, volume: np.ndarray) -> np.ndarray:
        return self.chain.apply(self.probabilities(volume))


def load_run(path: Path, *, device: str = "cpu", overrides: dict | None = None,
             checkpoint_name: str = "best") -> RunPredictor:
    """Open a run and its model (or, for an ensemble run, its members); ``overrides`` replace
    ``[inference]`` keys (e.g. tta, overlap; for an ensemble, its members')."""
    run = open_run(path)
    spec = Experiment.model_validate(run.read("spec.json"))
    if overrides:
        spec = spec.model_copy(update={"inference": spec.inference.model_copy(update=overrides)})
    if spec.ensemble is not None:  # combines its member runs' probabilities; the chain is its own
        from vesuvius_lab.core.ensemble import load_ensemble

        return load_ensemble(run, spec, device=device, overrides=overrides, checkpoint_name=checkpoint_name)
    model = registry.build("models", spec.model.plugin, spec.model.params, window=spec.data.window,
                           in_channels=1, out_channels=1, inference=spec.inference)
    if isinstance(model, SelfTrainingModel):
        model.load(run.path, device)
        probabilities = model.predict_probabilities
    else:
        probabilities = _module_predictor(model, run, spec, device, checkpoint_name)
    chain = build_chain(spec.postprocess, threshold=spec.inference.threshold, device=device,
                        runs_dir=run.path.parent.parent)
    return RunPredictor(run, spec, probabilities, chain)


def _module_predictor(model, run: Run, spec: Experiment, device: str, name: str):
    from vesuvius_lab.core.inference import predict_volume

    path = run.checkpoints / f"{name}.pt"
    if not path.is_file() and name == "best":
        path = run.checkpoints / "last.pt"
    state = checkpoint.load(path)
    checkpoint.load_model_state(model, state, path, spec.model.plugin, spec.model.params)
    model.to(device).eval()

    def probabilities(volume: np.ndarray) -> np.ndarray:
        return predict_volume(volume, model, spec.inference, window=spec.inference_window, device=device)

    return probabilities


def input_volumes(source: Path) -> list[tuple[str, Path]]:
    """(id, path) for a TIFF file or every TIFF in a folder."""
    source = Path(source)
    if source.is_file():
        return [(source.stem, source)]
    if not source.is_dir():
        raise UserError(f"{source}: no such file or folder. Pass a .tif volume or a folder of them.")
    found = sorted(p for p in source.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    if not found:
        raise UserError(f"{source}: the folder holds no .tif volumes. Point --input at e.g. test_images/.")
    return [(p.stem, p) for p in found]


def check_window_fits(spec: Experiment, volume_id: str, shape: tuple[int, ...]) -> None:
    """A volume smaller than the window along every axis is almost certainly the wrong input."""
    window = spec.inference_window
    if all(s < w for s, w in zip(shape, window)):
        raise UserError(f"{volume_id}: the volume {shape} is smaller than the window {tuple(window)} along "
                        "every axis. Predict full-size volumes, or use a run with a smaller [inference] window.")


def predict_files(predictor: RunPredictor, volumes: list[tuple[str, Path]], output: Path, *,
                  probabilities: bool = False) -> Iterator[str]:
    """Write ``<id>.tif`` masks (and ``<id>_prob.tif`` float16 probabilities); yield each id when done."""
    for volume_id, path in volumes:
        volume = read_volume(path)
        check_window_fits(predictor.spec, volume_id, volume.shape)
        prob = predictor.probabilities(volume)
        if probabilities:
            write_volume(output / f"{volume_id}_prob.tif", prob.astype(np.float16), compression="zlib")
        write_volume(output / f"{volume_id}.tif", predictor.chain.apply(prob))
        yield volume_id


def write_submission(predictor: RunPredictor, volumes: list[tuple[str, Path]], zip_path: Path) -> Iterator[str]:
    """The competition's ``submission.zip``: ``<id>.tif`` uint8 masks of each input's shape; yields ids."""
    import io

    import tifffile

    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for volume_id, path in volumes:
            volume = read_volume(path)
            check_window_fits(predictor.spec, volume_id, volume.shape)
            mask = predictor.mask(volume)
            if mask.shape != volume.shape or mask.dtype != np.uint8:
                raise RuntimeError(f"{volume_id}: prediction {mask.shape} {mask.dtype} does not match the input")
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, mask, compression="lzw", photometric="minisblack")
            archive.writestr(f"{volume_id}.tif", buffer.getvalue())
            yield volume_id
