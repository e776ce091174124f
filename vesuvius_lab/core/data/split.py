"""The training/validation split of one run: which volumes train, which validate, where they are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.data.dataset import LABEL_VALUES, Dataset, Derived, open_volume
from vesuvius_lab.core.errors import UserError

#: How many voxels of a label hold each byte value, cached beside the decoded label: a run's start-up checks
#: label values without reading every label again.
LABEL_COUNTS = Derived("label-counts1", lambda label: np.bincount(np.asarray(label).ravel(), minlength=256),
                       "label value counts")


@dataclass(frozen=True)
class TrainingSplit:
    dataset: Dataset
    train_ids: list[str]
    val_ids: list[str]
    folds: list[list[str]]  # validation ids of every fold
    note: str | None  # set when the folds could not be grouped as asked

    def image(self, volume_id: str) -> Path:
        return self.dataset.image_path(volume_id)

    def label(self, volume_id: str) -> Path:
        return self.dataset.label_path(volume_id)


def make_split(spec: Experiment) -> TrainingSplit:
    """Fold ``spec.data.fold`` of ``spec.data.folds`` folds, grouped as ``spec.data.group_by`` says;
    fold "all" trains on every volume and validates on none."""
    dataset = Dataset.open(Path(spec.data.root))
    folds = dataset.folds(spec.data.folds, spec.data.group_by)
    train_ids, val_ids = (dataset.ids, []) if spec.data.fold == "all" else folds.split(spec.data.fold)
    return TrainingSplit(dataset, train_ids, val_ids, [list(ids) for ids in folds.validation], folds.note)


def check_volumes(split: TrainingSplit, window: tuple[int, int, int], cache_dir: Path) -> None:
    """Decode (and cache) every volume of the split and check it, before a run folder is created.

    Unreadable files, image/label shapes that differ, label values outside {0, 1, 2} and a
    training window larger than every volume are user errors raised here, so a bad dataset costs
    no half-made run. Once the cache holds a volume, this reads no voxel of it: shapes come from the
    cache entries, label values from their cached counts (:data:`LABEL_COUNTS`), and the entries'
    checksums are trusted where a stamp says they matched (:mod:`~vesuvius_lab.core.data.array_cache`).
    """
    shapes = []
    for volume_id in split.train_ids + split.val_ids:
        image = open_volume(split.image(volume_id), cache_dir)
        label = open_volume(split.label(volume_id), cache_dir)
        if image.shape != label.shape:
            raise UserError(f"{split.label(volume_id)}: label shape {label.shape} differs from the image shape "
                            f"{image.shape} ({split.image(volume_id)}). Each label must match its image voxel "
                            "for voxel; `vlab data check` lists every such problem.")
        highest = int(np.flatnonzero(open_volume(split.label(volume_id), cache_dir, LABEL_COUNTS)).max(initial=0))
        if highest > max(LABEL_VALUES):
            raise UserError(f"{split.label(volume_id)}: label values outside {{0, 1, 2}} (found {highest}). "
                            "Labels are 0 background, 1 surface, 2 unlabeled; `vlab data check` lists them all.")
        shapes.append(image.shape)
    if shapes and all(any(w > s for w, s in zip(window, shape)) for shape in shapes):
        smallest = tuple(min(shape[axis] for shape in shapes) for axis in range(3))
        raise UserError(f"data.window {tuple(window)} is larger than every training volume along some axis "
                        f"(the smallest sides are {smallest}). Choose a window that fits the volumes.")
