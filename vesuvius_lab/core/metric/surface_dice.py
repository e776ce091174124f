"""Surface Dice at a tolerance, equal to DeepMind's ``surface_distance`` package (spacing 1).

The package puts a surface element at every corner of the voxel grid whose 2x2x2 neighbourhood
is mixed, weights it by an area looked up from the neighbourhood code, and counts an element as
overlapping when the other mask's nearest element is within the tolerance (from a full
Euclidean distance transform). With unit spacing the distances between corners are square
roots of integers, so "within the tolerance" is a lookup in a fixed ball of offsets: no
distance transform is needed, and the sums are the package's up to float rounding.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit


@cache
def _surface_area_table() -> np.ndarray:
    from surface_distance import lookup_tables

    return np.asarray(lookup_tables.create_table_neighbour_code_to_surface_area((1.0, 1.0, 1.0)), np.float64)


@cache
def _ball_offsets(tolerance: float) -> np.ndarray:
    """Integer offsets within ``tolerance`` of the origin, nearest first (most hits stop early)."""
    r = int(np.floor(tolerance))
    grid = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1].reshape(3, -1).T
    squared = (grid ** 2).sum(axis=1)
    keep = np.sqrt(squared) <= tolerance
    order = np.argsort(squared[keep], kind="stable")
    return np.ascontiguousarray(grid[keep][order], dtype=np.int64)


@njit(cache=True)
def _corner_codes(mask):
    """Neighbourhood code of every grid corner, as the package's 2x2x2 correlation computes it:
    corner (i, j, k) sees voxels (i-1..i, j-1..j, k-1..k), bit 128 for the first, 1 for the last."""
    n0, n1, n2 = mask.shape
    codes = np.zeros((n0 + 1, n1 + 1, n2 + 1), np.uint8)
    for x in range(n0):
        for y in range(n1):
            for z in range(n2):
                if not mask[x, y, z]:
                    continue
                # voxel v is offset d = v - c + 1 from corner c = v + 1 - d; its bit is 128 >> (4 d0 + 2 d1 + d2)
                for d0 in range(2):
                    for d1 in range(2):
                        for d2 in range(2):
                            codes[x + 1 - d0, y + 1 - d1, z + 1 - d2] |= 128 >> (4 * d0 + 2 * d1 + d2)
    return codes


@njit(cache=True)
def near_surface(other_codes, x, y, z, offsets) -> bool:
    """Whether a surface element of ``other_codes`` lies at one of the offsets from corner (x, y, z)."""
    n0, n1, n2 = other_codes.shape
    for i in range(offsets.shape[0]):
        ox, oy, oz = x + offsets[i, 0], y + offsets[i, 1], z + offsets[i, 2]
        if ox < 0 or oy < 0 or oz < 0 or ox >= n0 or oy >= n1 or oz >= n2:
            continue
        other = other_codes[ox, oy, oz]
        if other != 0 and other != 255:
            return True
    return False


@njit(cache=True)
def _surface_overlap(codes, other_codes, areas, offsets):
    """(area of the surface in ``codes``, area of it within the offsets of the other surface)."""
    n0, n1, n2 = codes.shape
    total = 0.0
    overlap = 0.0
    for x in range(n0):
        for y in range(n1):
            for z in range(n2):
                code = codes[x, y, z]
                if code == 0 or code == 255:
                    continue
                area = areas[code]
                total += area
                if near_surface(other_codes, x, y, z, offsets):
                    overlap += area
    return total, overlap


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def surface_dice(pred: np.ndarray, label: np.ndarray, tolerance: float = 2.0) -> float:
    """Surface Dice of two boolean masks; 1.0 when both are empty, 0.0 when exactly one is."""
    pred, label = np.asarray(pred, bool), np.asarray(label, bool)
    if pred.shape != label.shape:
        raise ValueError(f"surface_dice needs masks of one shape, got {pred.shape} and {label.shape}")
    union = pred | label
    if not union.any():
        return 1.0
    if not pred.any() or not label.any():
        return 0.0
    box = _bounding_box(union)  # corners outside it are surface in neither mask
    codes_pred = _corner_codes(np.ascontiguousarray(pred[box]).view(np.uint8))
    codes_label = _corner_codes(np.ascontiguousarray(label[box]).view(np.uint8))
    areas, offsets = _surface_area_table(), _ball_offsets(float(tolerance))
    total_label, overlap_label = _surface_overlap(codes_label, codes_pred, areas, offsets)
    total_pred, overlap_pred = _surface_overlap(codes_pred, codes_label, areas, offsets)
    return float((overlap_label + overlap_pred) / (total_label + total_pred))
