"""A blender plugin: a Hann (raised-cosine) window, floored so that no weight is zero."""

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vesuvius_lab.core.registry import plugin


class HannParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    floor: float = Field(1e-3, gt=0, le=1, description="Smallest weight, relative to the centre.")


@plugin(HannParams)
def hann(params: HannParams, *, window, **context) -> np.ndarray:
    """Raised-cosine weights: 1 at the window centre, falling smoothly to `floor` at its edges."""
    axes = [np.hanning(size + 2)[1:-1] if size > 1 else np.ones(1) for size in window]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), params.floor).astype(np.float32)
