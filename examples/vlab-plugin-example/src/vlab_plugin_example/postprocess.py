"""A post-processor that needs the whole volume: keep the largest connected components.

It says so with ``halo="global"``, and gives with ``global_pass=`` its chunked form, which the global pass
of a large volume runs on dask with the same result (components across chunks from
``vesuvius_lab.core.inference.chunked``).
"""

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vesuvius_lab.core.registry import plugin


class KeepLargestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(1, ge=1, description="Components kept: the largest, and any as large as the last kept.")
    connectivity: Literal[6, 26] = Field(26, description="Neighbourhood defining a component.")


def _kept(sizes: np.ndarray, count: int) -> np.ndarray:
    """Which labels to keep (label 0, the background, never): those at least as large as the count-th
    largest component, so that ties are kept whatever the labels' numbering."""
    if len(sizes) <= 1:
        return np.zeros(len(sizes), bool)
    smallest = np.sort(sizes[1:])[::-1][min(count, len(sizes) - 1) - 1]
    keep = sizes >= smallest
    keep[0] = False
    return keep


def _keep_largest_chunked(params: KeepLargestParams, *, threshold: float = 0.5, **context):
    from vesuvius_lab.core.inference import chunked

    def step(volume):
        labels, count = chunked.label(chunked.to_mask(volume, threshold), params.connectivity)
        return chunked.look_up(labels, _kept(chunked.per_label(labels, count), params.count))

    return step


@plugin(KeepLargestParams, halo="global", global_pass=_keep_largest_chunked)
def keep_largest(params: KeepLargestParams, *, threshold: float = 0.5, **context):
    """Keep the largest connected components of the mask (the scroll's main sheets), drop the rest."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 1 if params.connectivity == 6 else 3)

    def step(volume: np.ndarray) -> np.ndarray:
        mask = volume > threshold if np.issubdtype(volume.dtype, np.floating) else volume != 0
        labels, count = ndimage.label(mask, structure)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        return _kept(sizes, params.count)[labels].astype(np.uint8)

    return step
