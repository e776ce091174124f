"""Training patches: foreground-biased, ignore-aware random crops with augmentation.

Volumes are memory-mapped, so a patch costs its own bytes, not the whole volume. Each rank and
each DataLoader worker draws from its own random stream (seeded from the run's seed, the rank,
the worker and the epoch), so ranks see different patches and a resumed run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vesuvius_lab.core.config.spec import Augment
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
        label = np.pad(label, pad, constant_values=2)
    return image, label


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
            switches: Augment) -> tuple[np.ndarray, np.ndarray]:
    """Flips, in-plane 90-degree rotations (square windows), intensity scale/shift and noise."""
    image = image.astype(np.float32) / 255.0
    if switches.flips:
        for axis in range(3):
            if rng.random() < 0.5:
                image, label = np.flip(image, axis), np.flip(label, axis)
    if switches.rot90 and image.shape[1] == image.shape[2]:
        turns = int(rng.integers(4))
        image, label = np.rot90(image, turns, (1, 2)), np.rot90(label, turns, (1, 2))
    if switches.intensity:
        image = image * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    if switches.noise and rng.random() < 0.5:
        image = image + rng.normal(0, rng.uniform(0, 0.05), image.shape).astype(np.float32)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


def damaged_label(label: np.ndarray, rng: np.random.Generator, corruption: CorruptionParams) -> np.ndarray:
    """The hole-stitching task's input: the label's surface with holes punched in, as a uint8 0/255 "image"."""
    return punch_holes(label, rng, **corruption.model_dump()) * np.uint8(255)


class PatchStream(IterableDataset):
    """An endless stream of (image (1, D, H, W) float32, label (1, D, H, W) uint8) training patches.

    With ``corruption`` (the hole-stitching task) the image is the label itself with holes punched
    into its sheets, and only geometric augmentation applies.
    """

    def __init__(self, sources: list[PatchSource], window: Sequence[int], *, foreground_share: float,
                 switches: Augment, seed: int, rank: int = 0, corruption: CorruptionParams | None = None):
        self.sources, self.window = sources, tuple(window)
        self.foreground_share, self.corruption = foreground_share, corruption
        if corruption is not None:
            switches = switches.model_copy(update={"intensity": False, "noise": False})
        self.switches = switches
        self.seed, self.rank = seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Seed the next iterator for this epoch (a resumed run starts its stream where it resumes)."""
        self.epoch = epoch

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, self.rank, worker.id if worker else 0, self.epoch])
        while True:
            source = self.sources[rng.integers(len(self.sources))]
            image, label = crop(source, self.window, rng, rng.random() < self.foreground_share)
            if self.corruption is not None:
                image = damaged_label(label, rng, self.corruption)
            image, label = augment(image, label, rng, self.switches)
            yield torch.from_numpy(image[None]), torch.from_numpy(label[None])
