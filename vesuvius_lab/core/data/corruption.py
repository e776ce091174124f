"""Damaging labels for the hole-stitching task: holes punched into the sheets, optional thinning and dust.

Part of the core because ``[data] task = "hole_stitching"`` uses it to make training inputs and
validation cases; the stitcher plugin trains on the same damage.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vesuvius_lab.core.config.spec import CorruptionParams  # noqa: F401  (its schema: the [data] corruption table)


def _ball_offsets(radius: int) -> np.ndarray:
    grid = np.mgrid[(slice(-radius, radius + 1),) * 3]
    return (grid ** 2).sum(axis=0) <= radius * radius


def _paint_ball(mask: np.ndarray, centre: Sequence[int], radius: int, value: int,
                only: np.ndarray | None = None) -> None:
    """Set the voxels of a ball (clipped to the volume) to ``value``; only where ``only`` is True if given."""
    lo = [max(c - radius, 0) for c in centre]
    hi = [min(c + radius + 1, n) for c, n in zip(centre, mask.shape)]
    where = tuple(slice(a, b) for a, b in zip(lo, hi))
    ball = _ball_offsets(radius)[tuple(slice(a - c + radius, b - c + radius) for a, b, c in zip(lo, hi, centre))]
    if only is not None:
        ball = ball & only[where]
    mask[where][ball] = value


#: Damage counts are per this many voxels (a 32^3 window).
DAMAGE_BLOCK = 32 ** 3


def _count(per_block: tuple[int, int], size: int, rng: np.random.Generator) -> int:
    """A random count in ``per_block`` for each whole block of ``size`` voxels (at least one block)."""
    blocks = max(1, round(size / DAMAGE_BLOCK))
    return int(rng.integers(per_block[0], per_block[1] + 1, size=blocks).sum())


def punch_holes(label: np.ndarray, rng: np.random.Generator, *, holes: tuple[int, int] = (2, 5),
                radius: tuple[int, int] = (2, 5), erode_probability: float = 0.0,
                dust: tuple[int, int] = (0, 0), dust_radius: int = 1) -> np.ndarray:
    """A uint8 {0, 1} copy of the surface (``label == 1``) with random holes, and optionally erosion and dust.

    ``holes``: how many balls (inclusive range) of ``radius`` (inclusive range) centred on surface
    voxels are cut out of the sheets per :data:`DAMAGE_BLOCK` voxels, so that a training window and
    a whole validation volume are damaged as densely. ``erode_probability``: chance of thinning the
    sheets by one voxel first (a sheet predicted too thin). ``dust``: how many small balls of
    ``dust_radius`` to add at random places per block (false positives). Other label values (e.g.
    the ignore label) are background.
    """
    from scipy import ndimage

    surface = label == 1
    mask = surface.astype(np.uint8)
    if erode_probability > 0 and rng.random() < erode_probability:
        # border_value=1: the volume's faces do not eat the sheets that cross them.
        mask = ndimage.binary_erosion(mask, _ball_offsets(1), border_value=1).astype(np.uint8)
    candidates = np.flatnonzero(surface)
    if candidates.size:
        for _ in range(_count(holes, mask.size, rng)):
            centre = np.unravel_index(candidates[rng.integers(candidates.size)], mask.shape)
            _paint_ball(mask, centre, int(rng.integers(radius[0], radius[1] + 1)), 0)
    for _ in range(_count(dust, mask.size, rng)):
        centre = [int(rng.integers(n)) for n in mask.shape]
        _paint_ball(mask, centre, dust_radius, 1)
    return mask
