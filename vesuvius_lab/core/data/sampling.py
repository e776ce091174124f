"""Training patches: foreground-biased, ignore-aware random crops with augmentation.

Volumes are memory-mapped, so a patch costs its own bytes, not the whole volume, and a training
volume is opened when it is first sampled (:class:`CachedVolumeSource`), so start-up and memory do
not grow with the number of volumes beyond the index. Each rank and
each DataLoader worker draws from its own random stream (seeded from the run's seed, the rank,
the worker and the epoch), so ranks see different patches and a resumed run is reproducible.
The augmentation (:mod:`vesuvius_lab.core.data.augment`) is seeded from that stream too.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vesuvius_lab.core.config.spec import Augment
from vesuvius_lab.core.data.corruption import CorruptionParams, punch_holes
from vesuvius_lab.core.data.dataset import IGNORE_LABEL, Derived, open_volume
from vesuvius_lab.core.data.skeleton import skeleton_target

#: The skeleton-recall targets of a whole label volume, computed once and cached beside the decoded
#: label (``open_volume(label_path, cache_dir, SKELETON_TARGETS)``); a patch crops its targets from it.
SKELETON_TARGETS = Derived("skeleton1", lambda label: skeleton_target(label, IGNORE_LABEL, thicken=1),
                           "skeleton targets")

#: Foreground coordinates kept per volume for oversampling (a subsample is plenty).
MAX_FOREGROUND_POINTS = 20_000


def surface_points(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) int64 coordinates of label == 1, at most :data:`MAX_FOREGROUND_POINTS` of them (a random subsample)."""
    points = np.argwhere(np.asarray(label) == 1)
    if len(points) > MAX_FOREGROUND_POINTS:
        points = points[rng.choice(len(points), MAX_FOREGROUND_POINTS, replace=False)]
    return points


#: The surface points of a whole label volume, computed once and cached beside the decoded label, so a
#: training process reads 480 KB of points for a volume instead of scanning its label.
SURFACE_POINTS = Derived("surface-points1", lambda label: surface_points(label, np.random.default_rng(0)),
                         "surface points")


@dataclass
class PatchSource:
    """One training volume: image, label and, for the skeleton-recall losses, the label's skeleton
    targets (all three memory-mapped), and some surface voxel coordinates."""

    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray  # (N, 3) int coordinates of label == 1
    skeleton: np.ndarray | None = None  # skeleton_target of the whole label

    @classmethod
    def from_arrays(cls, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    skeleton: np.ndarray | None = None) -> "PatchSource":
        return cls(image, label, surface_points(label, rng), skeleton)

    @property
    def has_skeleton(self) -> bool:
        return self.skeleton is not None

    def without_skeleton(self) -> "PatchSource":
        return replace(self, skeleton=None)

    def release(self) -> None:
        """Nothing to give back: the arrays are the caller's."""


class CachedVolumeSource:
    """A training volume of the decoded-volume cache (:func:`~vesuvius_lab.core.data.dataset.open_volume`),
    opened when a patch is first drawn from it: the image, the label, its surface points
    (:data:`SURFACE_POINTS`) and, with ``skeleton``, its skeleton targets, each on first use. Building a
    stream of hundreds of volumes costs their paths; a volume never sampled is never read. Pickled (a
    spawned worker), it carries its paths only."""

    def __init__(self, image_path: Path, label_path: Path, cache_dir: Path, *, skeleton: bool = False):
        self.image_path, self.label_path, self.cache_dir = Path(image_path), Path(label_path), Path(cache_dir)
        self.has_skeleton = skeleton

    @cached_property
    def image(self) -> np.ndarray:
        return open_volume(self.image_path, self.cache_dir)

    @cached_property
    def label(self) -> np.ndarray:
        return open_volume(self.label_path, self.cache_dir)

    @cached_property
    def foreground(self) -> np.ndarray:
        return open_volume(self.label_path, self.cache_dir, SURFACE_POINTS)

    @cached_property
    def skeleton(self) -> np.ndarray | None:
        return open_volume(self.label_path, self.cache_dir, SKELETON_TARGETS) if self.has_skeleton else None

    def without_skeleton(self) -> "CachedVolumeSource":
        return CachedVolumeSource(self.image_path, self.label_path, self.cache_dir)

    def release(self) -> None:
        """Unmap the pages a patch touched (the page cache keeps them; the next patch maps them again). Without
        this, every page ever read stays in the process's resident memory: with hundreds of volumes, that
        grows with the volumes sampled, not with the patch."""
        for name in ("image", "label", "skeleton"):
            handle = getattr(self.__dict__.get(name), "_mmap", None)
            if handle is not None:
                handle.madvise(mmap.MADV_DONTNEED)

    def __getstate__(self) -> dict:
        return {key: self.__dict__[key] for key in ("image_path", "label_path", "cache_dir", "has_skeleton")}


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
         foreground: bool) -> tuple[np.ndarray, ...]:
    """A (window)-sized crop of the image, the label and (when the source has them) the skeleton
    targets, padded where the volume is smaller; padding is labelled ignore (2). The arrays are
    views of the memory maps where no padding was needed (the augmentation copies them)."""
    centre = source.foreground[rng.integers(len(source.foreground))] if foreground and len(source.foreground) else None
    start = _crop_start(rng, source.image.shape, window, centre)
    region = tuple(slice(s, s + w) for s, w in zip(start, window))
    arrays = [source.image[region], source.label[region]]
    if source.skeleton is not None:
        arrays.append(source.skeleton[region])
    if arrays[0].shape != tuple(window):
        pad = [(0, w - s) for s, w in zip(arrays[0].shape, window)]
        arrays = [np.pad(array, pad, constant_values=IGNORE_LABEL if index == 1 else 0)
                  for index, array in enumerate(arrays)]
    return tuple(arrays)


def damaged_label(label: np.ndarray, rng: np.random.Generator, corruption: CorruptionParams) -> np.ndarray:
    """The hole-stitching task's input: the label's surface with holes punched in, as a uint8 0/255 "image"."""
    return punch_holes(label, rng, **corruption.model_dump()) * np.uint8(255)


class PatchStream(IterableDataset):
    """An endless stream of (image (1, D, H, W) float32, targets (1, D, H, W) uint8) training
    patches, augmented as ``switches`` (``[data.augment]``) says; the targets are the label.

    With ``skeleton``, the targets have a second channel: the label's skeleton-recall target
    (:data:`SKELETON_TARGETS`, cropped from each source's ``skeleton`` and moved with the label by
    the augmentation); :func:`split_targets` takes them apart. With ``corruption`` (the
    hole-stitching task) the image is the label itself with holes punched into its sheets, and
    only geometric augmentation applies.
    """

    def __init__(self, sources: list[PatchSource | CachedVolumeSource], window: Sequence[int], *,
                 foreground_share: float, switches: Augment, seed: int, rank: int = 0,
                 corruption: CorruptionParams | None = None, skeleton: bool = False):
        if skeleton and not all(source.has_skeleton for source in sources):
            raise ValueError("skeleton targets were asked for, but a source has none (open them with "
                             "open_volume(label_path, cache_dir, SKELETON_TARGETS))")
        self.sources = sources if skeleton else [source.without_skeleton() for source in sources]
        self.window = tuple(window)
        self.foreground_share, self.corruption = foreground_share, corruption
        self.switches = switches
        from vesuvius_lab.core.data.augment import PatchAugmenter  # MONAI: seconds to import, paid by training only

        self.augment = PatchAugmenter(switches, self.window, geometric_only=corruption is not None)
        self.seed, self.rank = seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Seed the next iterator for this epoch (a resumed run starts its stream where it resumes)."""
        self.epoch = epoch

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, self.rank, worker.id if worker else 0, self.epoch])
        self.augment.seed_from(rng)
        while True:
            source = self.sources[rng.integers(len(self.sources))]
            image, label, *skeleton = crop(source, self.window, rng, rng.random() < self.foreground_share)
            if self.corruption is not None:
                image = damaged_label(np.asarray(label), rng, self.corruption)
            sample = self.augment(image, label, *skeleton)  # copies the patch out of the memory maps
            source.release()
            yield sample


def split_targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of targets (B, 1 or 2, D, H, W) -> label (B, 1, D, H, W) and skeleton (or None)."""
    if targets.shape[1] == 1:
        return targets, None
    return targets[:, :1].contiguous(), targets[:, 1:].contiguous()
