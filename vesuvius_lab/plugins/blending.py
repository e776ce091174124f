"""Blender plugins: the weight map that overlapping sliding windows are averaged with.

Contract: the factory receives ``window`` (D, H, W) and returns a float32 numpy array of that
shape whose values are all strictly positive (every voxel of a window must count a little, so
that every voxel of a volume gets a defined prediction). The inference engine computes
``sum(weight * prediction) / sum(weight)`` over the windows covering each voxel, so only the
ratios between weights matter, not their scale.

A third party adds a blender with an entry point in the group ``vesuvius_lab.blenders``.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vesuvius_lab.core.registry import NoParams, plugin

Shape3 = tuple[int, int, int]

#: The smallest weight a built-in blender gives (relative to its largest, 1 or nearly 1).
WEIGHT_FLOOR = 1e-3


def _per_axis(value: float | tuple[float, ...], ndim: int) -> tuple[float, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * ndim


def _outer(profiles: list[np.ndarray]) -> np.ndarray:
    """The separable map whose profile along axis i is ``profiles[i]`` (float32 throughout)."""
    weights = profiles[0]
    for profile in profiles[1:]:
        weights = weights[..., None] * profile
    return weights.astype(np.float32, copy=False)


@plugin(NoParams)
def mean(params: NoParams, *, window: Shape3, **context) -> np.ndarray:
    """Every voxel of a window weighs the same: overlaps are plain averages."""
    return np.ones(tuple(window), dtype=np.float32)


class GaussianParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sigma_scale: Union[float, tuple[float, float, float]] = Field(
        0.125, description="Sigma as a fraction of each window side (one value, or one per axis).")

    @field_validator("sigma_scale")
    @classmethod
    def _positive(cls, value):
        if min(_per_axis(value, 3)) <= 0:
            raise ValueError("sigma_scale must be positive")
        return value


@plugin(GaussianParams)
def gaussian(params: GaussianParams, *, window: Shape3, **context) -> np.ndarray:
    """Centre voxels weigh most, edges least (MONAI's and nnU-Net's Gaussian), which hides seams."""
    # The same map as MONAI's compute_importance_map(mode="gaussian"), computed the same way in
    # torch so that it is bit-identical on the CPU: sigma = side * sigma_scale, centred between
    # the two middle voxels of an even side, not normalised, floored at max(min, 1e-3).
    import torch

    weights = None
    for side, scale in zip(window, _per_axis(params.sigma_scale, len(window))):
        x = torch.arange(-(side - 1) / 2.0, (side - 1) / 2.0 + 1, dtype=torch.float32)
        profile = torch.exp(x**2 / (-2 * (side * scale) ** 2))
        weights = profile if weights is None else weights.unsqueeze(-1) * profile
    weights = torch.clamp(weights, min=max(float(weights.min()), WEIGHT_FLOOR))
    return weights.numpy().astype(np.float32, copy=False)


class RampParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    margin: float = Field(0.25, ge=0, le=0.5,
                          description="Fraction of each window side over which the weight rises linearly from the edge.")


def _ramp_profile(side: int, margin: float) -> np.ndarray:
    """1 in the middle, falling linearly over ``margin * side`` voxels to 1/(m+1) at each edge."""
    ramp = max(int(round(margin * side)), 0)
    distance_to_edge = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32)
    return np.minimum(1.0, (distance_to_edge + 1) / (ramp + 1)).astype(np.float32)


@plugin(RampParams)
def ramp(params: RampParams, *, window: Shape3, **context) -> np.ndarray:
    """Full weight in the middle, falling linearly over a margin towards each window edge."""
    return _outer([_ramp_profile(int(side), params.margin) for side in window])


class CenterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: float = Field(0.5, gt=0, le=1, description="Fraction of each window side, centred, kept at full weight.")
    edge_weight: float = Field(WEIGHT_FLOOR, gt=0, lt=1,
                               description="Weight outside the kept centre (it only decides where no centre reaches).")


def _center_profile(side: int, keep: float, edge_weight: float) -> np.ndarray:
    kept = max(1, int(round(keep * side)))
    start = (side - kept) // 2
    profile = np.full(side, edge_weight, dtype=np.float32)
    profile[start:start + kept] = 1
    return profile


@plugin(CenterParams)
def center(params: CenterParams, *, window: Shape3, **context) -> np.ndarray:
    """Keep each window's centre and (nearly) drop its edges: crop-and-stitch blending."""
    # With overlap 0.5 and keep 0.5 the kept centres tile the volume; edge_weight only fills the
    # volume's outer rim, which no centre reaches.
    profiles = [_center_profile(int(side), params.keep, params.edge_weight) for side in window]
    # The product of profiles would give edge_weight**3 in corners; floor it at edge_weight.
    return np.maximum(_outer(profiles), params.edge_weight).astype(np.float32)
