"""``vlab validate`` checks of the nnunet params against the whole experiment; nothing heavy is imported.

The 3d_lowres check reads the volume shapes from TIFF headers and applies nnU-Net's rule: a
3d_lowres configuration is planned only when the median volume is much larger (about 8x, see
:data:`FULLRES_PATCH_VOXELS`) than the 3d_fullres patch. It is skipped on the synthetic demo data
(``vlab data synth``): a full-size experiment validated there is meant for the competition's
volumes, which the demo's small ones say nothing about.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vesuvius_lab.plugins.nnunet.params import PLANNERS, NnUNetParams
from vesuvius_lab.plugins.nnunet.prediction import prediction_problems
from vesuvius_lab.plugins.nnunet.trainers import trainer_problem

#: Voxels of the 3d_fullres patch each planner picks for large isotropic volumes at its default
#: memory target (nnunetv2 2.8.1): ResEncM and the default planner 128^3, ResEncL 192^3,
#: ResEncXL 256x224x224. Smaller volumes get the whole volume as patch.
FULLRES_PATCH_VOXELS = {
    "nnUNetPlannerResEncM": 128**3,
    "nnUNetPlannerResEncL": 192**3,
    "nnUNetPlannerResEncXL": 256 * 224 * 224,
    "ExperimentPlanner": 128**3,
}
#: nnU-Net keeps 3d_lowres when the median volume has at least ~8 fullres patches of voxels
#: (measured: ResEncM keeps it at 256^3, drops it at 224^3); below 7 it surely drops it.
LOWRES_MIN_PATCHES = 7
SHAPE_SAMPLE = 25  # volumes whose headers are read for the median shape


def check_params(params: NnUNetParams, spec: Any) -> Iterator[tuple[str, str]]:
    """(key path under params, message) for every problem found."""
    problem = trainer_problem(params.trainer)
    if problem:
        yield "trainer", problem
    if params.configuration == "3d_cascade_fullres":
        yield "configuration", ("3d_cascade_fullres is not supported by the nnunet model: the cascade needs "
                                "out-of-fold 3d_lowres predictions of every training volume first. Use "
                                "'3d_lowres' or '3d_fullres'.")
    if spec.data.ignore_label != 2:
        yield "", (f"[data] ignore_label = {spec.data.ignore_label}: the nnunet model uses label 2 as nnU-Net's "
                   "ignore label. Set ignore_label = 2.")
    if params.save_probabilities and not params.final_validation:
        yield "save_probabilities", ("needs final_validation = true (the probabilities are those of nnU-Net's "
                                     "validation).")
    yield from _shrink_problems(params)
    if params.shrink and params.shrink.batch_size and params.shrink.batch_size < spec.train.nproc:
        yield "shrink.batch_size", (f"{params.shrink.batch_size} is less than [train] nproc = {spec.train.nproc}: "
                                    "nnU-Net splits each batch over its DDP processes. Raise the batch size.")
    yield from prediction_problems(params, spec.inference)
    if params.configuration == "3d_lowres":
        yield from _lowres_problems(params, spec)
    yield from _init_problems(spec)


def _init_problems(spec: Any) -> Iterator[tuple[str, str]]:
    """An existing ``train.init`` that cannot be nnU-Net weights, refused before any planning or
    preprocessing (a missing one is refused by training, before a run folder exists)."""
    if not spec.train.init:
        return
    from vesuvius_lab.plugins.nnunet.pretrained import init_problem

    runs_dir = _runs_dir()
    for candidate in (Path(spec.train.init).expanduser(), *([runs_dir / spec.train.init] if runs_dir else [])):
        if candidate.exists():
            problem = init_problem(candidate)
            if problem:
                yield "", problem
            return


def _patch_problems(params: NnUNetParams) -> Iterator[tuple[str, str]]:
    if params.patch_size is None:
        return
    if params.shrink is not None and params.shrink.patch_size is not None:
        yield "patch_size", (f"{params.patch_size} and shrink.patch_size {params.shrink.patch_size} both set the "
                             "patch size. Keep one: patch_size (the planned network at another patch) or "
                             "shrink.patch_size (with the rest of shrink).")
        return
    dims = 2 if params.configuration == "2d" else 3
    if len(params.patch_size) != dims:
        yield "patch_size", (f"the {params.configuration} configuration needs {dims} sides, "
                             f"got {len(params.patch_size)}.")
    stages = params.shrink and (params.shrink.n_stages or (len(params.shrink.features_per_stage)
                                                           if params.shrink.features_per_stage else None))
    if stages and any(side % 2 ** (stages - 1) for side in params.patch_size):
        yield "patch_size", (f"{params.patch_size}: with {stages} stages each side must be divisible by "
                             f"{2 ** (stages - 1)} (the network halves it {stages - 1} times).")


def _shrink_problems(params: NnUNetParams) -> Iterator[tuple[str, str]]:
    yield from _patch_problems(params)
    shrink = params.shrink
    if shrink is None:
        return
    dims = 2 if params.configuration == "2d" else 3
    if shrink.patch_size is not None and len(shrink.patch_size) != dims:
        yield "shrink.patch_size", (f"the {params.configuration} configuration needs {dims} sides, "
                                    f"got {len(shrink.patch_size)}.")
    if shrink.features_per_stage is not None and shrink.n_stages is not None \
            and len(shrink.features_per_stage) != shrink.n_stages:
        yield "shrink.features_per_stage", (f"{len(shrink.features_per_stage)} entries for n_stages = "
                                            f"{shrink.n_stages}; give one per stage.")
    stages = shrink.n_stages or (len(shrink.features_per_stage) if shrink.features_per_stage else None)
    if stages and shrink.patch_size and any(side % 2 ** (stages - 1) for side in shrink.patch_size):
        yield "shrink.patch_size", (f"{shrink.patch_size}: with {stages} stages each side must be divisible by "
                                    f"{2 ** (stages - 1)} (the network halves it {stages - 1} times).")


def _lowres_problems(params: NnUNetParams, spec: Any) -> Iterator[tuple[str, str]]:
    if params.gpu_memory_gb not in (None, PLANNERS[params.planner][2]):
        return  # the patch size of a custom memory target is not known without planning
    data_root = _data_root(spec)
    if data_root is not None and _is_synthetic(data_root):
        return
    median = median_shape(data_root)
    if median is None:
        return
    patch = FULLRES_PATCH_VOXELS[params.planner]
    if math.prod(median) < LOWRES_MIN_PATCHES * patch:
        yield "configuration", (
            f"{params.planner} does not create 3d_lowres for these volumes (median shape {list(median)}): nnU-Net "
            f"plans 3d_lowres only when a volume holds about 8 of its 3d_fullres patches (~{round(patch ** (1 / 3))}^3 "
            f"voxels), i.e. volumes of about {round((8 * patch) ** (1 / 3))}^3 or more. Use configuration = "
            "'3d_fullres', which already sees most of each volume.")


def _data_root(spec: Any) -> Path | None:
    from vesuvius_lab.core.config.project import load_project
    from vesuvius_lab.core.errors import UserError

    try:
        return Path(load_project().resolve(spec).data.root)
    except (UserError, OSError):
        return None


def _runs_dir() -> Path | None:
    from vesuvius_lab.core.config.project import load_project
    from vesuvius_lab.core.errors import UserError

    try:
        return load_project().runs_dir
    except (UserError, OSError):
        return None


def _is_synthetic(data_root: Path) -> bool:
    from vesuvius_lab.core.data.synthetic import MARKER

    return (Path(data_root) / MARKER).is_file()


def median_shape(data_root: Path | None) -> tuple[int, ...] | None:
    """Median (D, H, W) of up to :data:`SHAPE_SAMPLE` training volumes, from their headers; None if none."""
    if data_root is None:
        return None
    files = sorted((Path(data_root) / "train_images").glob("*.tif"))
    if not files:
        return None
    import tifffile

    shapes = []
    for path in files[:: max(1, len(files) // SHAPE_SAMPLE)][:SHAPE_SAMPLE]:
        try:
            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
        except Exception:  # an unreadable file is reported by the data check, not here
            continue
        if len(shape) == 3:
            shapes.append(shape)
    return tuple(int(s) for s in np.median(shapes, axis=0)) if shapes else None
