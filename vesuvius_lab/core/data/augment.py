"""Training augmentation: MONAI's dictionary transforms, configured by ``[data.augment]``.

A patch arrives as uint8 arrays: the image, the label and, for the skeleton-recall losses, the
label's skeleton target. It leaves as ``{"image": (1, D, H, W) float32 in 0..1, "label": targets}``
where the targets are a (1 or 2, D, H, W) uint8 tensor: the label, and the skeleton as a second
channel when there is one. Both channels travel as one tensor, through the transforms and through
the DataLoader (one fewer shared-memory tensor per batch).

The order of the transforms is: orientation (flips, quarter turns), resampling (affine, elastic),
intensity (noise, blur, brightness, contrast, low resolution, gamma; the image only).

* Flips and quarter turns move whole voxels, so they are done first, as views of the uint8 crop,
  before anything is converted: the same arrays as MONAI's ``Flip`` and ``Rotate90``
  (``tests/test_augment.py`` checks it) for a tenth of the time. Their random draws are MONAI's
  (``RandFlipd``'s, ``RandRotate90d``'s). Being symmetries of every other transform's random
  draws, doing them first changes no distribution.
* The resampling transforms are MONAI's ``RandAffined`` and ``Rand3DElasticd``, subclassed so
  that a patch that does not draw one is passed through untouched (MONAI resamples it with an
  identity grid or converts it to float). The image is resampled linearly, the targets with
  nearest. Voxels that a resampling brings in from outside the patch must not read as background,
  so the label travels shifted by one (``label + 1``) with zero padding: whatever is 0 afterwards
  came from outside and becomes the ignore label. The skeleton channel is kept inside the label's
  surface afterwards.
* The elastic deformation has the same random draws and the same displacement field as MONAI's
  (to float rounding) but smooths the field as three products with banded (n, n) matrices: 0.8
  ms per 16x64x64 patch on one core, where MONAI's three ``conv3d`` calls with (k, 1, 1) kernels
  take about 45 ms.

Every transform draws from its own ``numpy`` stream, seeded through :meth:`PatchAugmenter.seed`
(MONAI's ``set_random_state``) from the patch stream's seed, so a run's patches are reproducible.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                              RandGaussianSmoothd, RandScaleIntensityd, RandScaleIntensityFixedMeand,
                              RandShiftIntensityd, RandSimulateLowResolutiond)
from monai.transforms.utils import create_grid
from monai.utils import convert_to_tensor, fall_back_tuple

from vesuvius_lab.core.config.spec import Augment
from vesuvius_lab.core.data.dataset import IGNORE_LABEL

IMAGE, LABEL = "image", "label"  # LABEL holds the targets: the label, and the skeleton as a second channel
#: MONAI's seeds are below 2**32.
MAX_SEED = 2**32

Sample = dict[Hashable, torch.Tensor]


class Orientation:
    """Random flips along D, H and W (each with ``flip_p``) and 1 to 3 quarter turns of the (H, W)
    plane (with ``rot90_p``; square windows only), drawn as MONAI's ``RandFlipd`` and
    ``RandRotate90d`` draw them and applied to (D, H, W) arrays as views: the copy that follows
    (the conversion to a tensor) is the only one."""

    def __init__(self, flip_p: float, rot90_p: float, quarter_turns: bool):
        self.flip_p, self.rot90_p, self.quarter_turns = flip_p, rot90_p, quarter_turns
        self.R = np.random.RandomState()

    def set_random_state(self, seed: int) -> None:
        self.R = np.random.RandomState(seed)

    def draw(self) -> tuple[tuple[bool, bool, bool], int]:
        """(flip D, flip H, flip W), then the number of quarter turns (0 to 3)."""
        flips = tuple(bool(self.R.rand() < self.flip_p) for _ in range(3)) if self.flip_p > 0 else (False,) * 3
        turns = 0
        if self.quarter_turns and self.rot90_p > 0:
            turns = self.R.randint(3) + 1
            turns *= bool(self.R.rand() < self.rot90_p)
        return flips, turns

    @staticmethod
    def apply(array: np.ndarray, flips: tuple[bool, bool, bool], turns: int) -> np.ndarray:
        """A view of ``array`` (D, H, W) flipped, then turned ``turns`` quarters from H towards W."""
        for axis, flip in enumerate(flips):
            if flip:
                array = np.flip(array, axis)
        return np.rot90(array, turns, axes=(1, 2)) if turns else array

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        flips, turns = self.draw()
        return [self.apply(array, flips, turns) for array in arrays]


def resample_with_targets(sample: Sample, resample: Callable[[Sample], Sample]) -> Sample:
    """``resample(sample)`` with the targets as float for it: the label shifted by one, so that the
    zero padding of voxels from outside the patch comes back as :data:`IGNORE_LABEL`; the skeleton
    channel kept inside the moved label's surface."""
    shifted = sample[LABEL].float()
    shifted[0] += 1.0
    moved = resample({**sample, LABEL: shifted})
    targets = convert_to_tensor(moved[LABEL], track_meta=False)
    label = torch.where(targets[0] == 0, IGNORE_LABEL, targets[0] - 1)
    channels = [label] + [skeleton * (label == 1) for skeleton in targets[1:]]
    return {**moved, IMAGE: convert_to_tensor(moved[IMAGE], dtype=torch.float32, track_meta=False),
            LABEL: torch.stack(channels).to(torch.uint8)}


class SkippingRandAffined(RandAffined):
    """MONAI's ``RandAffined``, with the same random draws and output, except that a patch that
    does not draw the transform is passed through untouched, and the targets are moved as
    :func:`resample_with_targets` says."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> Sample:
        d = dict(data)
        self.randomize(None)
        self.rand_affine.randomize()
        if not self._do_transform:
            return d
        size = fall_back_tuple(self.rand_affine.spatial_size, d[IMAGE].shape[1:])
        grid = self.rand_affine.rand_affine_grid(size, grid=self.rand_affine.get_identity_grid(size, lazy=False),
                                                 lazy=False)

        def resample(sample: Sample) -> Sample:
            for key, mode, padding_mode in self.key_iterator(sample, self.mode, self.padding_mode):
                sample[key] = self.rand_affine(sample[key], None, mode, padding_mode, True, grid, lazy=False)
            return sample

        return resample_with_targets(d, resample)


class FastRand3DElasticd(Rand3DElasticd):
    """MONAI's ``Rand3DElasticd`` without its affine part: the same random draws and the same field,
    smoothed by matrix products; a patch that does not draw it is passed through untouched (see the
    module doc). Called on a sample of :class:`PatchAugmenter`, it moves the targets as
    :func:`resample_with_targets` says; on any other dictionary, every key as MONAI would."""

    def __init__(self, keys, sigma_range: tuple[float, float], magnitude_range: tuple[float, float],
                 prob: float = 0.1, mode="bilinear", padding_mode="reflection", targets: bool = False):
        super().__init__(keys, sigma_range, magnitude_range, prob=prob, mode=mode, padding_mode=padding_mode)
        self.targets = targets

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Sample:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        elastic = self.rand_3d_elastic
        size = fall_back_tuple(elastic.spatial_size, d[self.first_key(d)].shape[1:])
        elastic.randomize(size)
        grid = create_grid(spatial_size=size, backend="torch")
        grid[:3] += smooth_field(torch.from_numpy(elastic.rand_offset), elastic.sigma) * elastic.magnitude

        def resample(sample: Sample) -> Sample:
            for key, mode, padding_mode in self.key_iterator(sample, self.mode, self.padding_mode):
                sample[key] = elastic.resampler(sample[key], grid, mode=mode, padding_mode=padding_mode)
            return sample

        return resample_with_targets(d, resample) if self.targets else resample(d)


def smooth_field(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """``field`` (C, D, H, W) filtered along D, H and W as MONAI's ``GaussianFilter(3, sigma, truncated=3)``
    filters it (its erf kernel, zero padding), as three products with banded matrices."""
    kernel = gaussian_1d(sigma, truncated=3.0, approx="erf").to(field.dtype)
    channels, depth, height, width = field.shape
    field = field @ _filter_matrix(width, kernel).T
    field = _filter_matrix(height, kernel) @ field
    return (_filter_matrix(depth, kernel) @ field.reshape(channels, depth, height * width)).reshape(field.shape)


def _filter_matrix(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """(n, n): row i holds the kernel centred on i, so ``matrix @ x`` is a zero-padded correlation."""
    radius = (len(kernel) - 1) // 2
    offset = torch.arange(n)[None, :] - torch.arange(n)[:, None] + radius
    inside = (offset >= 0) & (offset < len(kernel))
    return torch.where(inside, kernel[offset.clamp(0, len(kernel) - 1)], torch.zeros((), dtype=kernel.dtype))


def resampling_transforms(spec: Augment, window: Sequence[int], image_mode: str = "bilinear") -> list:
    """Affine and elastic, for the image and the targets."""
    keys, modes = [IMAGE, LABEL], (image_mode, "nearest")
    transforms = []
    if spec.affine.p > 0:
        angles = spec.affine.rotate if isinstance(spec.affine.rotate, tuple) else (spec.affine.rotate,) * 3
        low, high = spec.affine.scale
        # MONAI scales the sampling grid: a zoom z of the content is a grid factor 1/z (MONAI adds 1).
        transforms.append(SkippingRandAffined(keys, prob=spec.affine.p,
                                              rotate_range=[math.radians(a) for a in angles],
                                              scale_range=[(1 / high - 1, 1 / low - 1)] * 3, mode=modes,
                                              padding_mode="zeros", spatial_size=tuple(window), cache_grid=True))
    if spec.elastic.p > 0:
        transforms.append(FastRand3DElasticd(keys, sigma_range=spec.elastic.sigma,
                                             magnitude_range=spec.elastic.magnitude, prob=spec.elastic.p,
                                             mode=modes, padding_mode="zeros", targets=True))
    return transforms


def intensity_transforms(spec: Augment) -> list:
    """Noise, blur, brightness, contrast, low resolution and gamma (nnU-Net's order), image only."""
    transforms = []
    if spec.noise.p > 0:
        transforms.append(RandGaussianNoised(IMAGE, prob=spec.noise.p, mean=0.0, std=spec.noise.std))
    if spec.blur.p > 0:
        sigma = spec.blur.sigma
        transforms.append(RandGaussianSmoothd(IMAGE, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=spec.blur.p))
    if spec.intensity.p > 0:
        low, high = spec.intensity.scale
        transforms.append(RandScaleIntensityd(IMAGE, factors=(low - 1, high - 1), prob=spec.intensity.p))
        if spec.intensity.shift > 0:
            transforms.append(RandShiftIntensityd(IMAGE, offsets=spec.intensity.shift, prob=spec.intensity.p))
    if spec.contrast.p > 0:
        low, high = spec.contrast.factor
        transforms.append(RandScaleIntensityFixedMeand(IMAGE, factors=(low - 1, high - 1), preserve_range=True,
                                                       prob=spec.contrast.p))
    if spec.low_resolution.p > 0:
        transforms.append(RandSimulateLowResolutiond(IMAGE, zoom_range=spec.low_resolution.zoom,
                                                     prob=spec.low_resolution.p))
    if spec.gamma.p > 0:
        transforms.append(RandAdjustContrastd(IMAGE, gamma=spec.gamma.gamma, retain_stats=True, prob=spec.gamma.p))
    return transforms


class PatchAugmenter:
    """The ``[data.augment]`` pipeline for patches of ``window``: uint8 arrays in, tensors out.

    ``geometric_only`` (the hole-stitching task, whose image is a damaged label): no intensity
    transforms, and the image is resampled with nearest interpolation so it stays binary.
    """

    def __init__(self, spec: Augment, window: Sequence[int], *, geometric_only: bool = False):
        self.orientation = Orientation(spec.flips.p, spec.rot90.p, quarter_turns=window[1] == window[2])
        transforms = resampling_transforms(spec, window, "nearest" if geometric_only else "bilinear")
        if not geometric_only:
            transforms += intensity_transforms(spec)
        self.transforms = Compose(transforms)

    def seed_from(self, rng: np.random.Generator) -> None:
        """Re-seed every transform from a draw of ``rng`` (the patch stream's)."""
        self.seed(int(rng.integers(MAX_SEED)))

    def seed(self, seed: int) -> None:
        """Re-seed every transform's random stream (MONAI's ``set_random_state``)."""
        streams = np.random.RandomState(int(seed) % MAX_SEED)
        self.orientation.set_random_state(int(streams.randint(MAX_SEED, dtype=np.uint32)))
        self.transforms.set_random_state(seed=int(streams.randint(MAX_SEED, dtype=np.uint32)))

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 skeleton: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, H, W) uint8 image, label and optional skeleton -> image (1, D, H, W) float32 in about
        0..1 and targets (1 or 2, D, H, W) uint8: the label, then the skeleton if given."""
        image, *targets = self.orientation(image, label, *([] if skeleton is None else [skeleton]))
        # One copy to float32 (a patch may be a read-only view of the memory-mapped cache).
        sample = {IMAGE: torch.from_numpy(np.array(image, dtype=np.float32)[None]).div_(255.0),
                  LABEL: torch.from_numpy(np.stack(targets))}
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: MONAI's metadata (for inverting transforms) costs ~1 ms a patch
        try:
            sample = self.transforms(sample)
        finally:
            set_track_meta(tracking)
        image = convert_to_tensor(sample[IMAGE], dtype=torch.float32, track_meta=False).contiguous()
        return image, sample[LABEL].contiguous()
