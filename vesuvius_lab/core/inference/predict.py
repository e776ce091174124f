"""Predicting with a trained run (opened by :func:`~vesuvius_lab.core.inference.run_kinds.load_run`): volumes
to probabilities, masks and the competition's submission zip."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from vesuvius_lab.core import interrupts
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.data.tiff import read_volume, write_volume
from vesuvius_lab.core.errors import UserError, absence
from vesuvius_lab.core.files import atomic_path
from vesuvius_lab.core.inference.run_kinds import RunPredictor


def input_volumes(source: Path) -> list[tuple[str, Path]]:
    """(id, path) for a TIFF file or every TIFF in a folder."""
    source = Path(source)
    if source.is_file():
        return [(source.stem, source)]
    if not source.is_dir():
        raise UserError(f"{source}: {absence(source, 'any')}. Pass a .tif volume or a folder of them.")
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


#: Where ``vlab predict --probabilities`` puts them, inside the output folder: beside the masks but
#: not among them, so the output folder is a valid input of ``vlab evaluate`` and the probabilities
#: folder one of ``vlab postprocess``, each file named ``<id>.tif`` like the masks.
PROBABILITIES_FOLDER = "probabilities"


def predict_files(predictor: RunPredictor, volumes: list[tuple[str, Path]], output: Path, *,
                  probabilities: bool = False) -> Iterator[str]:
    """Write ``<id>.tif`` masks (and float16 probabilities as ``probabilities/<id>.tif``); yield each id.
    A stop signal stops after the volume in progress: every file written is whole."""
    with interrupts.stop_signals(at="after this volume"):
        yield from _predict_files(predictor, volumes, output, probabilities)


def _predict_files(predictor: RunPredictor, volumes: list[tuple[str, Path]], output: Path,
                   probabilities: bool) -> Iterator[str]:
    for volume_id, path in volumes:
        interrupts.check()
        volume = read_volume(path)
        check_window_fits(predictor.spec, volume_id, volume.shape)
        prob = predictor.probabilities(volume)
        if probabilities:
            write_volume(output / PROBABILITIES_FOLDER / f"{volume_id}.tif", prob.astype(np.float16),
                         compression="zlib")
        write_volume(output / f"{volume_id}.tif", predictor.chain.apply(prob))
        yield volume_id


def write_submission(predictor: RunPredictor, volumes: list[tuple[str, Path]], zip_path: Path) -> Iterator[str]:
    """The competition's ``submission.zip``: ``<id>.tif`` uint8 masks of each input's shape; yields ids.
    A stop signal stops after the volume in progress, and no zip is written (it would lack volumes)."""
    import io

    import tifffile

    with interrupts.stop_signals(at="after this volume, writing no zip"), atomic_path(zip_path) as tmp, \
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for volume_id, path in volumes:
            interrupts.check()
            volume = read_volume(path)
            check_window_fits(predictor.spec, volume_id, volume.shape)
            mask = predictor.mask(volume)
            if mask.shape != volume.shape or mask.dtype != np.uint8:
                raise RuntimeError(f"{volume_id}: prediction {mask.shape} {mask.dtype} does not match the input")
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, mask, compression="lzw", photometric="minisblack")
            archive.writestr(f"{volume_id}.tif", buffer.getvalue())
            yield volume_id
