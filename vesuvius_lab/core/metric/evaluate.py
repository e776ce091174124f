"""Score prediction files against label files: pair them by id, check them, score in parallel.

``vlab evaluate`` is a thin layer over this module; the scores come from
:func:`vesuvius_lab.core.metric.score.score_volume`, as in training validation and the leaderboard.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vesuvius_lab.core import children, interrupts
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
        with children.process_pool(min(workers, len(pairs)), context) as pool:  # a stop ends the workers at once
            waiting = {pool.submit(score_pair, pair, ignore_label) for pair in pairs}
            while waiting:
                done, waiting = wait(waiting, timeout=interrupts.POLL_S, return_when=FIRST_COMPLETED)
                interrupts.check()  # between volumes: a stop asked for while the command waits
                for future in done:
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
    """(shape, None) of a readable 3D uint8 TIFF, else (None, what is wrong): the headers only, read by
    the one cheap check of input files (:func:`vesuvius_lab.core.data.tiff.header_problems`)."""
    from vesuvius_lab.core.data.tiff import header_problems

    shape, problems = header_problems(path)
    return shape, (" ".join(problems) or None)


def _shape_mismatch(pair: VolumePair, pred_shape, label_shape) -> str:
    return (f"{pair.pred}: shape {tuple(pred_shape)} differs from its label {pair.label} {tuple(label_shape)}; "
            "predict the volume at the label's shape")
