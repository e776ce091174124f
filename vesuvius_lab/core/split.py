"""The training/validation split of one run: which volumes train, which validate, where they are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vesuvius_lab.core.data import Dataset
from vesuvius_lab.core.spec import Experiment


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
    """Fold ``spec.data.fold`` of ``spec.data.folds`` folds, grouped as ``spec.data.group_by`` says."""
    dataset = Dataset.open(Path(spec.data.root))
    folds = dataset.folds(spec.data.folds, spec.data.group_by)
    train_ids, val_ids = folds.split(spec.data.fold)
    return TrainingSplit(dataset, train_ids, val_ids, [list(ids) for ids in folds.validation], folds.note)
