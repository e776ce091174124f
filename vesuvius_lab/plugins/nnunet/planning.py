"""Fingerprint, plan and preprocess a converted dataset through nnU-Net's Python API, once per input.

Each step is skipped when its output is already in the cache: the fingerprint, the plans file
of a planner (and memory target), the preprocessed data of a configuration. Callers set the
nnU-Net folders (:func:`~vesuvius_lab.plugins.nnunet.environment.nnunet_environ`) and hold the
cache lock.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import write_text_atomic
from vesuvius_lab.plugins.nnunet.conversion import RawDataset
from vesuvius_lab.plugins.nnunet.params import PLANNERS


def plans_name(planner: str, gpu_memory_gb: float | None) -> str:
    """The plans name a planner writes; a non-default memory target gets its own name (e.g. ``..._16GB``)."""
    _, name, default_gb = PLANNERS[planner]
    if gpu_memory_gb is None or gpu_memory_gb == default_gb:
        return name
    return f"{name}_{gpu_memory_gb:g}GB"


def planner_class(planner: str) -> type:
    module, _, _ = PLANNERS[planner]
    return getattr(importlib.import_module(module), planner)


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or half-written."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def ensure_plans(dataset: RawDataset, preprocessed_root: Path, planner: str, gpu_memory_gb: float | None,
                 workers: int, log: Callable[[str], None] = print) -> dict:
    """Fingerprint and plan ``dataset`` unless done before; return the plans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)

    folder = Path(preprocessed_root) / dataset.name
    if read_json(folder / "dataset_fingerprint.json") is None:
        log(f"nnU-Net: extracting the dataset fingerprint of {dataset.name}")
        extract_fingerprint_dataset(dataset.id, num_processes=workers, check_dataset_integrity=False,
                                    clean=True, verbose=False, show_progress_bar=True)
    name = plans_name(planner, gpu_memory_gb)
    plans_file = folder / f"{name}.json"
    plans = read_json(plans_file)
    if plans is None or "configurations" not in plans:
        log(f"nnU-Net: planning with {planner} -> {name}")
        default_gb = PLANNERS[planner][2]
        plan_experiment_dataset(dataset.id, planner_class(planner),
                                gpu_memory_target_in_gb=None if gpu_memory_gb in (None, default_gb) else gpu_memory_gb,
                                overwrite_plans_name=None if name == PLANNERS[planner][1] else name)
        plans = read_json(plans_file)
    return plans


def require_configuration(plans: dict, configuration: str, plans_file: Path) -> None:
    """Raise a :class:`UserError` explaining why the planner did not create ``configuration``."""
    available = list(plans["configurations"])
    if configuration in available:
        return
    fullres = plans["configurations"].get("3d_fullres", {})
    median = fullres.get("median_image_size_in_voxels")
    why = ""
    if configuration in ("3d_lowres", "3d_cascade_fullres"):
        why = (f" nnU-Net creates 3d_lowres (and the cascade built on it) only when the volumes are much larger "
               f"than the 3d_fullres patch; here the median volume is {median} voxels and the 3d_fullres patch "
               f"{fullres.get('patch_size')}, so 3d_fullres already sees most of each volume.")
    raise UserError(f"{plans_file}: the plans have no {configuration!r} configuration.{why} Use one of "
                    f"{', '.join(repr(c) for c in available)} (params.configuration), e.g. '3d_fullres'.")


def ensure_preprocessed(dataset: RawDataset, preprocessed_root: Path, plans_identifier: str, configuration: str,
                        workers: int, log: Callable[[str], None] = print) -> None:
    """Run nnU-Net's preprocessing of one configuration unless it finished before."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    marker = Path(preprocessed_root) / dataset.name / f".vlab_preprocessed_{plans_identifier}_{configuration}"
    if marker.is_file():
        return
    log(f"nnU-Net: preprocessing {dataset.name} for {plans_identifier} {configuration}")
    preprocess_dataset(dataset.id, plans_identifier, [configuration], [workers], verbose=False,
                       show_progress_bar=True)
    write_text_atomic(marker, "done\n")
