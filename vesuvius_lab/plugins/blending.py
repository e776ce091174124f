"""Blender plugins: the weight map that overlapping sliding windows are averaged with.

Contract: the factory receives ``window`` (D, H, W) and returns a float32 numpy array of that
shape whose values are all strictly positive (every voxel of a window must count a little).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vesuvius_lab.core.registry import NoParams, plugin


@plugin(NoParams)
def mean(params: NoParams, *, window, **context) -> np.ndarray:
    """Every voxel of a window weighs the same: overlaps are plain averages."""
    return np.ones(tuple(window), dtype=np.float32)


class GaussianParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sigma_scale: float = Field(0.125, gt=0, description="Sigma as a fraction of each window side.")


@plugin(GaussianParams)
def gaussian(params: GaussianParams, *, window, **context) -> np.ndarray:
    """Centre voxels weigh most (a Gaussian, as nnU-Net and MONAI use), so window edges leave no seams."""
    from scipy.ndimage import gaussian_filter

    window = tuple(int(s) for s in window)
    impulse = np.zeros(window, dtype=np.float32)
    impulse[tuple(s // 2 for s in window)] = 1
    weights = gaussian_filter(impulse, [s * params.sigma_scale for s in window], mode="constant", cval=0)
    weights = weights / weights.max()
    # No zero weights: voxels at the far edge of a window still count a little.
    return np.maximum(weights, weights[weights > 0].min()).astype(np.float32)
