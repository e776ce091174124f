"""The contract for model plugins that own their training and prediction (e.g. nnU-Net).

Most model plugins return a ``torch.nn.Module`` that the core trains. A plugin whose framework
has its own planning, training loop and predictor instead returns an object satisfying
:class:`SelfTrainingModel`; the core then hands it a :class:`TrainJob` and later asks it for
per-volume probabilities, and everything downstream (post-processing, metric, run records,
leaderboard, ensembles) is the same as for any other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np


@dataclass
class TrainJob:
    """Everything a self-training backend needs to train one fold of one experiment."""

    spec: Any  # the resolved vesuvius_lab.core.config.spec.Experiment
    data_root: Path  # competition layout: train_images/, train_labels/, train.csv
    train_ids: list[str]
    val_ids: list[str]
    fold: int | str  # a fold number, or "all": every volume trains and val_ids is empty
    folds: list[list[str]]  # validation ids of every fold, so a backend can mirror the split
    run_dir: Path  # the run's directory; the backend keeps its artefacts under run_dir / "backend"
    cache_dir: Path  # shared cache (converted datasets, plans) reused across runs
    device: str  # "cpu" or "cuda"
    init: Path | None = None  # [train] init: start from these weights (a run directory or a checkpoint file)
    log: Callable[[str], None] = print  # goes to the console and the run's log
    extra: dict = field(default_factory=dict)


@runtime_checkable
class SelfTrainingModel(Protocol):
    def train(self, job: TrainJob) -> None:
        """Train on ``job``; leave what :meth:`load` needs under ``job.run_dir``."""

    def load(self, run_dir: Path, device: str) -> None:
        """Prepare to predict with the model trained in ``run_dir``."""

    def predict_probabilities(self, volume: np.ndarray) -> np.ndarray:
        """Surface probability per voxel, float32 (D, H, W), for a uint8 volume (D, H, W)."""


#: Optional, beside the three methods: a backend may have a ``components`` attribute, a dict naming
#: what it used in place of the experiment's components, with keys among ``"loss"`` and ``"blend"``
#: (e.g. ``{"loss": "nnU-Net nnUNetTrainer (its own)"}``). The run's summary records it and the
#: leaderboard, ``vlab compare`` and run reports show it instead of the ``[[loss]]`` or blender the
#: backend never used. It is not part of the protocol, so backends without it still qualify.
COMPONENT_KEYS = ("loss", "blend")

#: Optional too: ``window_model()`` returning ``(network, inference)``: a callable from float windows
#: (B, 1, d, h, w) with intensities scaled to [0, 1] (uint8 / 255) to logits (B, 1 or 2, d, h, w), with the
#: backend's own intensity normalisation inside, and an object with the ``[inference]`` keys of
#: :class:`~vesuvius_lab.core.config.spec.InferenceSpec` (window, overlap, blend, batch_size, tta, axes) it is
#: predicted with. With it, ``vlab predict --output OUT.zarr`` predicts volumes of any size block by block
#: through the core's sliding windows; without it, such a run predicts whole volumes only.
