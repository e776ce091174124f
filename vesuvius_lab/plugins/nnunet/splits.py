"""nnU-Net's ``splits_final.json`` from our folds, so that nnU-Net's fold k is our fold k."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vesuvius_lab.core.files import write_json_atomic


def splits_from_folds(folds: Sequence[Sequence[str]]) -> list[dict[str, list[str]]]:
    """One ``{"train": [...], "val": [...]}`` per fold: val = the fold's ids, train = every other id."""
    every = sorted({str(case) for fold in folds for case in fold})
    splits = []
    for fold in folds:
        val = sorted(str(case) for case in fold)
        splits.append({"train": [case for case in every if case not in set(val)], "val": val})
    return splits


def write_splits(folder: Path, folds: Sequence[Sequence[str]]) -> Path:
    """Write ``splits_final.json`` into a preprocessed dataset folder; return its path."""
    path = Path(folder) / "splits_final.json"
    write_json_atomic(path, splits_from_folds(folds))
    return path
