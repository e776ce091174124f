"""Score prediction files against label files: pair them by id, check them, score in parallel.

``vlab evaluate`` is a thin layer over this module; the scores come from
:func:`vesuvius_lab.core.metric.score.score_volume`, as in training validation and the leaderboard.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vesuvius_lab.core.errors import UserError, absence
from vesuvius_lab.core.metric.score import IGNORE_LABEL, VolumeScore

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class VolumePair:
    id: str
    pred: Path
    label: Path


@dataclass(frozen=True)
class Evaluation:
    """Scores by id (sorted by id), and the volumes that could not be scored, one message each."""

    scores: list[tuple[str, VolumeScore]]
    problems: list[str]


def pair_volumes(pred: Path, label: Path) -> list[VolumePair]:
    """Pair two TIFF files, or the ``<id>.tif`` files of two folders, and check what the TIFF
    headers tell (readable, 3D uint8, one shape per pair). Raises :class:`UserError` listing
    every problem at once: ids on one side only, unreadable files, shape mismatches."""
    pred, label = Path(pred), Path(label)
    pairs, problems = _match(pred, label)
    for pair in pairs:
        problems.extend(_header_problems(pair))
    if problems:
        raise UserError(f"{len(problems)} problem(s) with the volumes to evaluate:\n  " + "\n  ".join(problems))
    return pairs


def evaluate_pairs(pairs: list[VolumePair], *, workers: int = 1, ignore_label: int | None = IGNORE_LABEL,
             on_volume: Callable[[str], None] | None = None) -> Evaluation:
    """Score every pair, in ``workers`` processes when more than one; ``on_volume(id)`` after each."""
    results = []
    if workers <= 1 or len(pairs) <= 1:
        for pair in pairs:
            results.append(score_pair(pair, ignore_label))
            if on_volume:
                on_volume(pair.id)
    else:
        import multiprocessing

        from vesuvius_lab.core.metric.score import warm_up

        warm_up()  # compile once here rather than in every worker
        # spawn, not fork: the caller may run threads (a progress bar) that fork would copy mid-lock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(pairs)), mp_context=context) as pool:
            futures = [pool.submit(score_pair, pair, ignore_label) for pair in pairs]
            for future in as_completed(futures):
                results.append(future.result())
                if on_volume:
                    on_volume(results[-1][0])
    results.sort(key=lambda item: item[0])
    return Evaluation(scores=[(i, score) for i, score, _ in results if score is not None],
                      problems=[problem for _, _, problem in results if problem is not None])


def score_pair(pair: VolumePair, ignore_label: int | None = IGNORE_LABEL) -> tuple[str, VolumeScore | None, str | None]:
    """(id, score, None), or (id, None, what went wrong) when a file cannot be used."""
    from vesuvius_lab.core.data.tiff import read_volume
    from vesuvius_lab.core.metric.score import score_volume

    try:
        pred, label = read_volume(pair.pred), read_volume(pair.label)
    except UserError as exc:
        return pair.id, None, str(exc)
    if pred.shape != label.shape:
        return pair.id, None, _shape_mismatch(pair, pred.shape, label.shape)
    return pair.id, score_volume(pred, label, ignore_label=ignore_label), None


def _match(pred: Path, label: Path) -> tuple[list[VolumePair], list[str]]:
    for path in (pred, label):
        if not path.exists():
            raise UserError(f"{path}: {absence(path, 'any')}. Give two TIFF files or two folders of <id>.tif "
                            "files.")
    if pred.is_file() and label.is_file():
        return [VolumePair(pred.stem, pred, label)], []
    if not (pred.is_dir() and label.is_dir()):
        raise UserError(f"{pred} and {label}: give two TIFF files or two folders, not one of each.")
    pred_files, problems = _tiff_files(pred)
    label_files, label_problems = _tiff_files(label)
    problems += label_problems
    for volume_id in sorted(pred_files.keys() - label_files.keys()):
        problems.append(f"{pred_files[volume_id]}: no label {volume_id}.tif in {label}")
    for volume_id in sorted(label_files.keys() - pred_files.keys()):
        problems.append(f"{label_files[volume_id]}: no prediction {volume_id}.tif in {pred}")
    common = sorted(pred_files.keys() & label_files.keys())
    if not pred_files and not label_files:
        problems.append(f"{pred} and {label}: no .tif files in either folder")
    return [VolumePair(i, pred_files[i], label_files[i]) for i in common], problems


def _tiff_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    files: dict[str, Path] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in TIFF_SUFFIXES:
            continue
        if path.stem in files:
            problems.append(f"{path} and {files[path.stem]}: two files for id {path.stem}; keep one")
        else:
            files[path.stem] = path
    return files, problems


def _header_problems(pair: VolumePair) -> list[str]:
    """What the TIFF headers show without decoding the voxels (decoding is left to scoring)."""
    shapes, problems = {}, []
    for path in (pair.pred, pair.label):
        shape, problem = _probe(path)
        if problem:
            problems.append(problem)
        shapes[path] = shape
    pred_shape, label_shape = shapes[pair.pred], shapes[pair.label]
    if not problems and pred_shape != label_shape:
        problems.append(_shape_mismatch(pair, pred_shape, label_shape))
    return problems


def _probe(path: Path) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape, None) of a readable 3D uint8 TIFF, else (None, what is wrong)."""
    import numpy as np
    import tifffile

    with _tifffile_log() as logged:
        try:
            with tifffile.TiffFile(path) as tif:
                size = path.stat().st_size
                pages = list(tif.pages)  # parses every page header: a truncated file loses pages
                ends = [o + c for page in pages for o, c in zip(page.dataoffsets, page.databytecounts)]
                series = tif.series[0]
                shape, dtype = tuple(series.shape), series.dtype
        except Exception as exc:  # tifffile raises many types for damaged files
            return None, f"{path}: cannot read this TIFF ({type(exc).__name__}: {exc}); copy or write it again"
    if logged or (ends and max(ends) > size):
        return None, f"{path}: the file is truncated or damaged; copy or write it again"
    if len(shape) != 3:
        return None, f"{path}: expected a 3D volume (one page per slice), found shape {shape}"
    if dtype != np.uint8:
        return None, f"{path}: expected uint8 voxels, found {dtype}"
    return shape, None


@contextmanager
def _tifffile_log() -> Iterator[list[str]]:
    """Collect (and keep off the console) what tifffile logs at ERROR level: damaged pages."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler, propagate = Collect(level=logging.ERROR), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _shape_mismatch(pair: VolumePair, pred_shape, label_shape) -> str:
    return (f"{pair.pred}: shape {tuple(pred_shape)} differs from its label {pair.label} {tuple(label_shape)}; "
            "predict the volume at the label's shape")
