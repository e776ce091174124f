"""Training patches: foreground-biased, ignore-aware random crops with augmentation.

Volumes are memory-mapped, so a patch costs its own bytes, not the whole volume. Each rank and
each DataLoader worker draws from its own random stream (seeded from the run's seed, the rank,
the worker and the epoch), so ranks see different patches and a resumed run is reproducible.
The augmentation (:mod:`vesuvius_lab.core.data.augment`) is seeded from that stream too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vesuvius_lab.core.config.spec import Augment
from vesuvius_lab.core.data.augment import IGNORE_LABEL, MAX_SEED, PatchAugmenter
from vesuvius_lab.core.data.corruption import CorruptionParams, punch_holes

#: Foreground coordinates kept per volume for oversampling (a subsample is plenty).
MAX_FOREGROUND_POINTS = 20_000


@dataclass
class PatchSource:
    """One training volume: image and label (memory-mapped) and some surface voxel coordinates."""

    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray  # (N, 3) int coordinates of label == 1

    @classmethod
    def from_arrays(cls, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> "PatchSource":
        points = np.argwhere(np.asarray(label) == 1)
        if len(points) > MAX_FOREGROUND_POINTS:
            points = points[rng.choice(len(points), MAX_FOREGROUND_POINTS, replace=False)]
        return cls(image, label, points)


def _crop_start(rng: np.random.Generator, shape: Sequence[int], window: Sequence[int],
                centre: np.ndarray | None) -> list[int]:
    starts = []
    for axis, (size, side) in enumerate(zip(shape, window)):
        high = max(size - side, 0)
        if centre is None:
            starts.append(int(rng.integers(0, high + 1)))
        else:
            starts.append(int(np.clip(centre[axis] - side // 2 + rng.integers(-side // 4, side // 4 + 1), 0, high)))
    return starts


def crop(source: PatchSource, window: Sequence[int], rng: np.random.Generator,
         foreground: bool) -> tuple[np.ndarray, np.ndarray]:
    """A (window)-sized crop, padded where the volume is smaller; padding is labelled ignore (2)."""
    centre = source.foreground[rng.integers(len(source.foreground))] if foreground and len(source.foreground) else None
    start = _crop_start(rng, source.image.shape, window, centre)
    region = tuple(slice(s, s + w) for s, w in zip(start, window))
    image = np.array(source.image[region], dtype=np.uint8)  # a copy: the memmap is read-only
    label = np.array(source.label[region], dtype=np.uint8)
    if image.shape != tuple(window):
        pad = [(0, w - s) for s, w in zip(image.shape, window)]
        image = np.pad(image, pad)
        label = np.pad(label, pad, constant_values=IGNORE_LABEL)
    return image, label


def damaged_label(label: np.ndarray, rng: np.random.Generator, corruption: CorruptionParams) -> np.ndarray:
    """The hole-stitching task's input: the label's surface with holes punched in, as a uint8 0/255 "image"."""
    return punch_holes(label, rng, **corruption.model_dump()) * np.uint8(255)


class PatchStream(IterableDataset):
    """An endless stream of (image (1, D, H, W) float32, label (1, D, H, W) uint8) training patches,
    augmented as ``switches`` (``[data.augment]``) says.

    With ``skeleton``, each patch also carries its label's skeleton-recall target (1, D, H, W)
    uint8, computed after augmentation (:func:`vesuvius_lab.core.data.skeleton.skeleton_target`):
    (image, label, skeleton). With ``corruption`` (the hole-stitching task) the image is the label
    itself with holes punched into its sheets, and only geometric augmentation applies.
    """

    def __init__(self, sources: list[PatchSource], window: Sequence[int], *, foreground_share: float,
                 switches: Augment, seed: int, rank: int = 0, corruption: CorruptionParams | None = None,
                 skeleton: bool = False):
        self.sources, self.window = sources, tuple(window)
        self.foreground_share, self.corruption = foreground_share, corruption
        self.switches = switches
        self.augment = PatchAugmenter(switches, self.window, geometric_only=corruption is not None)
        self.seed, self.rank = seed, rank
        self.epoch = 0
        self.skeleton = skeleton
        if skeleton:
            from vesuvius_lab.core.data import skeleton as skeletons

            skeletons.warm_up()  # compiled here, before DataLoader workers fork, so none of them compiles

    def set_epoch(self, epoch: int) -> None:
        """Seed the next iterator for this epoch (a resumed run starts its stream where it resumes)."""
        self.epoch = epoch

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, self.rank, worker.id if worker else 0, self.epoch])
        self.augment.seed(int(rng.integers(MAX_SEED)))
        if self.skeleton:
            from vesuvius_lab.core.data.skeleton import skeleton_target
        while True:
            source = self.sources[rng.integers(len(self.sources))]
            image, label = crop(source, self.window, rng, rng.random() < self.foreground_share)
            if self.corruption is not None:
                image = damaged_label(label, rng, self.corruption)
            image, label = self.augment(image, label)
            if self.skeleton:
                target = skeleton_target(label[0].numpy(), ignore_label=IGNORE_LABEL, thicken=1)
                yield image, label, torch.from_numpy(target[None])
            else:
                yield image, label
