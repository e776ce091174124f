"""This run's own nnU-Net folders, beside the shared cache.

``<run>/backend/nnUNet_preprocessed/<dataset>/`` holds what differs between runs of one dataset:
``splits_final.json`` (our folds), the plans actually trained (shrunk or not), plus copies of
``dataset.json`` and the fingerprint that nnU-Net's trainer reads there. The preprocessed
volumes stay in the cache. ``<run>/backend/nnUNet_results/`` receives nnU-Net's checkpoints and
logs (``.../fold_<k>/training_log_*.txt``), ``<run>/backend/nnunet.json`` records how to load the
trained model, and ``<run>/backend/nnunet.log`` holds everything nnU-Net printed (its epoch log among
it); the run's own log gets one line per epoch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import write_json_atomic
from vesuvius_lab.plugins.nnunet.splits import write_splits

BACKEND = "backend"
RECORD = "nnunet.json"
OUTPUT_LOG = "nnunet.log"  # nnU-Net's console output


def backend_folder(run_dir: Path) -> Path:
    return Path(run_dir) / BACKEND


def prepare_preprocessed_view(run_dir: Path, shared_dataset: Path, plans: dict,
                              folds: Sequence[Sequence[str]], *, with_ground_truth: bool = False) -> Path:
    """Fill this run's ``nnUNet_preprocessed/<dataset>`` folder; return the ``nnUNet_preprocessed`` root."""
    root = backend_folder(run_dir) / "nnUNet_preprocessed"
    folder = root / Path(shared_dataset).name
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copyfile(Path(shared_dataset) / name, folder / name)
    write_json_atomic(folder / f"{plans['plans_name']}.json", plans)
    write_splits(folder, folds)
    if with_ground_truth:  # nnU-Net's final validation scores against these
        _link_folder(Path(shared_dataset) / "gt_segmentations", folder / "gt_segmentations")
    return root


def _link_folder(source: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        return
    try:
        os.symlink(source, target, target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)


def write_record(run_dir: Path, record: dict) -> None:
    write_json_atomic(backend_folder(run_dir) / RECORD, record)


def read_record(run_dir: Path) -> dict:
    """The record written by training, or a :class:`UserError` when this run has no trained nnU-Net model."""
    path = backend_folder(run_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found, so {run_dir} holds no nnU-Net model. Train it first "
                        "(vlab train) or pick another run.") from None
    except ValueError as exc:
        raise UserError(f"{path}: unreadable ({exc}). Retrain this run.") from None
