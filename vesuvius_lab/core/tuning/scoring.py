"""Scoring a post-processing chain on many cases, trial after trial, on all cores.

Each case is given to one worker process for good (case i to worker i mod n), so the work that
depends on the label alone (a :class:`~vesuvius_lab.core.metric.prepared.PreparedLabel`) is done
once per case and reused by every trial, and the probabilities stay memory-mapped there. With one
worker (or one case) everything runs in this process.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vesuvius_lab.core import children
from vesuvius_lab.core.data.tiff import read_volume
from vesuvius_lab.core.inference.postprocess import build_chain
from vesuvius_lab.core.metric.prepared import PreparedLabel, warm_up
from vesuvius_lab.core.metric.score import VolumeScore
from vesuvius_lab.core.tuning.cases import Case

#: A chain as it travels to a worker: its steps (plugin tables) and the threshold.
ChainSpec = tuple[list[dict[str, Any]], float]

_loaded: dict[str, tuple[PreparedLabel, np.ndarray]] = {}  # per process: case id -> label parts, probabilities


def score_case(case: Case, chain: ChainSpec, ignore_label: int | None, runs_dir: str | None) -> VolumeScore:
    """The competition score of ``case`` after the chain (its label prepared once per process)."""
    if case.id not in _loaded:
        label = read_volume(Path(case.label))
        _loaded[case.id] = (PreparedLabel.from_label(label, ignore_label=ignore_label),
                            np.load(case.probabilities, mmap_mode="r"))
    prepared, probabilities = _loaded[case.id]
    steps, threshold = chain
    built = build_chain(steps, threshold=threshold, runs_dir=Path(runs_dir) if runs_dir else None)
    return prepared.score(built.apply(np.asarray(probabilities, dtype=np.float32)))


class CaseScorer:
    """Scores chains on a fixed set of cases; ``workers`` processes, each owning some of the cases."""

    def __init__(self, cases: list[Case], *, ignore_label: int | None, workers: int, runs_dir: Path):
        self.cases = {case.id: case for case in cases}
        self.ignore_label, self.runs_dir = ignore_label, str(runs_dir)
        warm_up()  # compile the metric's kernels once (numba caches them on disk for the workers)
        count = max(1, min(workers, len(cases)))
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
        # Its workers end with this process and leave Ctrl-C to it: a trial is never cut in a worker.
        self.pools = [ProcessPoolExecutor(1, mp_context=context, **children.pool_options())
                      for _ in range(count)] if count > 1 else []
        self.owner = {case.id: index % max(count, 1) for index, case in enumerate(cases)}

    def score(self, chain: ChainSpec, ids: list[str]) -> dict[str, VolumeScore]:
        """The score of every case in ``ids`` after ``chain``."""
        if not self.pools:
            return {i: score_case(self.cases[i], chain, self.ignore_label, self.runs_dir) for i in ids}
        futures = {i: self.pools[self.owner[i]].submit(score_case, self.cases[i], chain, self.ignore_label,
                                                       self.runs_dir) for i in ids}
        # No stop is taken inside a trial (it would be lost); the tuner checks for one between trials.
        return {i: future.result() for i, future in futures.items()}

    def close(self, *, at_once: bool = False) -> None:
        """Shut the workers down; ``at_once`` (after a stop or an error): without waiting for their work."""
        for pool in self.pools:
            if at_once:
                children.end_pool(pool)
            else:
                pool.shutdown(cancel_futures=True)

    def __enter__(self) -> "CaseScorer":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(at_once=kind is not None)
