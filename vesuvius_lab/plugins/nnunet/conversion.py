"""Competition layout -> nnU-Net raw dataset, cached by content.

``train_images/<id>.tif`` and ``train_labels/<id>.tif`` become ``imagesTr/<id>_0000.tif`` and
``labelsTr/<id>.tif``, each with the ``<id>.json`` spacing file that nnU-Net's ``Tiff3DIO``
reader looks for, and a ``dataset.json`` declaring the labels background 0, surface 1 and
ignore 2 (so nnU-Net excludes unlabeled voxels from its loss and Dice). A digest of the inputs
names the dataset folder: converting the same volumes again finds that folder and does nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vesuvius_lab.core.data.tiff import read_volume
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import write_json_atomic
from vesuvius_lab.plugins.nnunet.content_hash import DigestMemo, dataset_key

#: Bump when the converted layout changes, so that old cached datasets are not reused.
CONVERSION_VERSION = "1"
DATASET_TITLE = "VesuviusSurface"
LABELS = {"background": 0, "surface": 1, "ignore": 2}
SPACING = {"spacing": [1.0, 1.0, 1.0]}
_DATASET_FOLDER = re.compile(r"^Dataset(\d{3})_")


@dataclass(frozen=True)
class RawDataset:
    """A converted dataset: nnU-Net's integer id, its ``DatasetNNN_Name`` and its folder."""

    id: int
    name: str
    folder: Path


def dataset_json(num_training: int) -> dict:
    """nnU-Net's ``dataset.json`` for our volumes: one CT channel, labels with ``ignore`` last."""
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": num_training,
        "file_ending": ".tif",
        "overwrite_image_reader_writer": "Tiff3DIO",
        "name": DATASET_TITLE,
        "description": "Vesuvius Challenge surface detection, converted by vesuvius-lab "
                       "(0 background, 1 papyrus surface, 2 unlabeled = nnU-Net's ignore label).",
    }


def source_files(data_root: Path, case_id: str) -> tuple[Path, Path]:
    """The image and label files of one training volume, or a :class:`UserError` naming the missing one."""
    image = Path(data_root) / "train_images" / f"{case_id}.tif"
    label = Path(data_root) / "train_labels" / f"{case_id}.tif"
    for path in (image, label):
        if not path.is_file():
            raise UserError(f"{path}: file not found, but volume {case_id!r} is listed for training. Restore the "
                            f"file or remove the row from {Path(data_root) / 'train.csv'}.")
    return image, label


def convert_dataset(data_root: Path, case_ids: Sequence[str], raw_root: Path,
                    log: Callable[[str], None] = print) -> RawDataset:
    """Make (or find) the raw dataset of ``case_ids`` under ``raw_root``; callers hold the cache lock."""
    from rich.progress import track

    from vesuvius_lab.core.console import err

    raw_root = Path(raw_root)
    raw_root.mkdir(parents=True, exist_ok=True)
    if not case_ids:
        raise UserError(f"{data_root}: no training volumes to convert for nnU-Net. Check train.csv.")
    files = {case_id: source_files(data_root, case_id) for case_id in sorted(set(map(str, case_ids)))}
    memo = DigestMemo(raw_root.parent / "file_digests.json")
    digests = [(case_id, memo.digest(image), memo.digest(label))
               for case_id, (image, label) in track(files.items(), description="nnU-Net: hashing volumes",
                                                    transient=True, console=err)]
    memo.save()
    suffix = dataset_key(digests, CONVERSION_VERSION)[:12]
    existing = find_dataset(raw_root, suffix)
    if existing is not None:
        log(f"nnU-Net raw dataset up to date: {existing.folder}")
        return existing
    dataset_id = free_dataset_id(raw_root, raw_root.parent / "nnUNet_preprocessed")
    name = f"Dataset{dataset_id:03d}_{DATASET_TITLE}_{suffix}"
    log(f"converting {len(files)} volumes to the nnU-Net raw dataset {name}")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=raw_root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        _write_dataset(staging, files)
        os.replace(staging, raw_root / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RawDataset(dataset_id, name, raw_root / name)


def find_dataset(raw_root: Path, suffix: str) -> RawDataset | None:
    """The converted dataset whose name ends with ``suffix``, if any."""
    for folder in sorted(Path(raw_root).glob(f"Dataset???_{DATASET_TITLE}_{suffix}")):
        if (folder / "dataset.json").is_file():
            return RawDataset(int(folder.name[7:10]), folder.name, folder)
    return None


def free_dataset_id(*roots: Path) -> int:
    """The lowest dataset id (1-999) not used by any folder in ``roots``."""
    used = {int(m.group(1)) for root in roots if Path(root).is_dir()
            for entry in os.listdir(root) if (m := _DATASET_FOLDER.match(entry))}
    for candidate in range(1, 1000):
        if candidate not in used:
            return candidate
    raise UserError(f"{roots[0]}: all 999 nnU-Net dataset ids are taken. Delete old datasets from this cache "
                    "folder (they are rebuilt when needed).")


def _write_dataset(folder: Path, files: dict[str, tuple[Path, Path]]) -> None:
    from rich.progress import track

    from vesuvius_lab.core.console import err

    images, labels = folder / "imagesTr", folder / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    for case_id, (image, label) in track(files.items(), description="nnU-Net: converting volumes",
                                                  transient=True, console=err):
        check_pair(image, label)
        _link_or_copy(image, images / f"{case_id}_0000.tif")
        _link_or_copy(label, labels / f"{case_id}.tif")
        write_json_atomic(images / f"{case_id}.json", SPACING)
        write_json_atomic(labels / f"{case_id}.json", SPACING)
    write_json_atomic(folder / "dataset.json", dataset_json(len(files)))


def check_pair(image_path: Path, label_path: Path) -> None:
    """Decode both volumes and check they fit together: same shape, labels 0, 1 or 2."""
    image, label = read_volume(image_path), read_volume(label_path)
    if image.shape != label.shape:
        raise UserError(f"{label_path}: shape {label.shape} differs from its image {image_path} {image.shape}. "
                        "Each label volume must have its image's shape.")
    unexpected = np.setdiff1d(np.unique(label), list(LABELS.values()))
    if unexpected.size:
        raise UserError(f"{label_path}: label values {unexpected.tolist()} are not 0 (background), 1 (surface) "
                        "or 2 (unlabeled). Fix the label volume.")


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (no extra disk) where the file system allows it, otherwise copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
