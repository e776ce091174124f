"""Training augmentation: MONAI's dictionary transforms, configured by ``[data.augment]``.

A patch is a dictionary ``{"image": (1, D, H, W) float32 in 0..1, "label": (1, D, H, W)}``.
Geometric transforms (affine, elastic, flips, rot90) move both keys together: the image with
linear interpolation, the label with nearest. Voxels that a resampling brings in from outside the
patch must not read as background, so the label travels shifted by one (``label + 1``) with zero
padding: whatever is 0 afterwards came from outside and becomes the ignore label. The ignore mask
is the label's ignore value, so it moves with the label. Intensity transforms touch the image only.

Every transform draws from its own ``numpy`` stream, seeded through :meth:`PatchAugmenter.seed`
(MONAI's ``set_random_state``) from the patch stream's seed, so a run's patches are reproducible.

Elastic deformation is MONAI's ``Rand3DElasticd`` (same random draws, same displacement field
to float rounding; ``tests/test_augment.py`` checks it) with two changes that make it cheap
enough for CPU loader workers. The Gaussian smoothing of the random field, with MONAI's own
kernel, is done as three products with banded (n, n) matrices: 0.8 ms per 16x64x64 patch on one
core, where MONAI's three ``conv3d`` calls with (k, 1, 1) kernels take about 45 ms (and scipy's
separable filter 7 ms). And a patch that does not draw the transform is passed through, where
MONAI still draws a full-size noise field and resamples every key with an identity grid (2.5 ms).
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrastd, RandAffined, RandFlipd,
                              RandGaussianNoised, RandGaussianSmoothd, RandRotate90d, RandScaleIntensityd,
                              RandScaleIntensityFixedMeand, RandShiftIntensityd, RandSimulateLowResolutiond)
from monai.transforms.utils import create_grid
from monai.utils import convert_to_tensor, fall_back_tuple

from vesuvius_lab.core.config.spec import Augment

IMAGE, LABEL = "image", "label"
#: The label value of voxels that no loss or metric looks at; padding gets it.
IGNORE_LABEL = 2
#: MONAI's seeds are below 2**32.
MAX_SEED = 2**32


class FastRand3DElasticd(Rand3DElasticd):
    """MONAI's ``Rand3DElasticd`` without its affine part: the same random draws and the same field,
    smoothed by matrix products, and nothing done when the transform is not drawn (see the module doc)."""

    def __init__(self, keys, sigma_range: tuple[float, float], magnitude_range: tuple[float, float],
                 prob: float = 0.1, mode="bilinear", padding_mode="reflection"):
        super().__init__(keys, sigma_range, magnitude_range, prob=prob, mode=mode, padding_mode=padding_mode)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        elastic = self.rand_3d_elastic
        size = fall_back_tuple(elastic.spatial_size, d[self.first_key(d)].shape[1:])
        elastic.randomize(size)
        grid = create_grid(spatial_size=size, backend="torch")
        grid[:3] += smooth_field(torch.from_numpy(elastic.rand_offset), elastic.sigma) * elastic.magnitude
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            d[key] = elastic.resampler(d[key], grid, mode=mode, padding_mode=padding_mode)
        return d


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


def geometric_transforms(spec: Augment, window: Sequence[int], image_mode: str = "bilinear") -> list:
    """Affine, elastic, flips and rot90 (the last for square (H, W) windows only), for image and label."""
    keys, modes = [IMAGE, LABEL], (image_mode, "nearest")
    transforms = []
    if spec.affine.p > 0:
        angles = spec.affine.rotate if isinstance(spec.affine.rotate, tuple) else (spec.affine.rotate,) * 3
        low, high = spec.affine.scale
        # MONAI scales the sampling grid: a zoom z of the content is a grid factor 1/z (MONAI adds 1).
        transforms.append(RandAffined(keys, prob=spec.affine.p, rotate_range=[math.radians(a) for a in angles],
                                      scale_range=[(1 / high - 1, 1 / low - 1)] * 3, mode=modes,
                                      padding_mode="zeros", spatial_size=tuple(window), cache_grid=True))
    if spec.elastic.p > 0:
        transforms.append(FastRand3DElasticd(keys, sigma_range=spec.elastic.sigma,
                                             magnitude_range=spec.elastic.magnitude, prob=spec.elastic.p,
                                             mode=modes, padding_mode="zeros"))
    if spec.flips.p > 0:
        transforms += [RandFlipd(keys, prob=spec.flips.p, spatial_axis=axis) for axis in range(3)]
    if spec.rot90.p > 0 and window[1] == window[2]:
        transforms.append(RandRotate90d(keys, prob=spec.rot90.p, max_k=3, spatial_axes=(1, 2)))
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
    """The ``[data.augment]`` pipeline for patches of ``window``: uint8 (image, label) in, tensors out.

    ``geometric_only`` (the hole-stitching task, whose image is a damaged label): no intensity
    transforms, and the image is resampled with nearest interpolation so it stays binary.
    """

    def __init__(self, spec: Augment, window: Sequence[int], *, geometric_only: bool = False):
        image_mode = "nearest" if geometric_only else "bilinear"
        transforms = geometric_transforms(spec, window, image_mode)
        if not geometric_only:
            transforms += intensity_transforms(spec)
        self.transforms = Compose(transforms)

    def seed(self, seed: int) -> None:
        """Re-seed every transform's random stream (MONAI's ``set_random_state``)."""
        self.transforms.set_random_state(seed=int(seed) % MAX_SEED)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, H, W) uint8 image and label -> image (1, D, H, W) float32 in about 0..1, label (1, D, H, W) uint8."""
        sample = {IMAGE: torch.from_numpy(np.ascontiguousarray(image)[None]).float().div_(255.0),
                  LABEL: torch.from_numpy(np.ascontiguousarray(label)[None]).float().add_(1.0)}
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: MONAI's metadata (for inverting transforms) costs ~1 ms a patch
        try:
            sample = self.transforms(sample)
        finally:
            set_track_meta(tracking)
        image = convert_to_tensor(sample[IMAGE], dtype=torch.float32, track_meta=False).contiguous()
        shifted = convert_to_tensor(sample[LABEL], track_meta=False)
        label = torch.where(shifted == 0, IGNORE_LABEL, shifted - 1).to(torch.uint8).contiguous()
        return image, label
