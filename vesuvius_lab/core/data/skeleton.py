"""The medial surface of a label's sheets: the target of the skeleton-recall losses.

Papyrus sheets are plates a few voxels thick, so their skeleton is a surface, not a curve (a
curve-thinning algorithm such as Lee's reduces a plate to a few voxels). :func:`medial_surface`
keeps, along the axis where a sheet is thinnest, the middle voxel of each run of sheet voxels:

* for every sheet voxel, the runs through it along D, H and W are measured and averaged over its
  3x3x3 neighbourhood; the shortest crosses the sheet closest to its normal;
* the middle voxel of a run along axis ``a`` is kept when no run through it is shorter than
  that one (ties keep it, so sheets at 45 degrees lose no voxel); a run cut by a face of the
  patch counts as longer than any whole one.

The result lies inside the sheet and is one voxel thin across it. :func:`skeleton_target`
thickens it by a small cross-shaped dilation, kept inside the label, as Kirchhoff et al. (ECCV
2024) "tube" theirs. Both run in numba in under a millisecond per 16x64x64 patch, so they belong
in the DataLoader workers (or nnU-Net's augmentation workers), not in the training step.
"""

from __future__ import annotations

import numba
import numpy as np


#: Added to the length of a run that touches a face of the patch: its true length is unknown (the
#: sheet goes on outside), so it never counts as where the sheet is thinnest while a closed run does.
OPEN = 1 << 20


@numba.njit(cache=True)
def _runs_along_last_axis(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each set voxel: the length of its run of set voxels along the last axis (plus
    :data:`OPEN` when the run touches a face) and its offset within the run."""
    rows, columns, size = mask.shape
    lengths = np.zeros(mask.shape, np.int32)
    offsets = np.zeros(mask.shape, np.int32)
    for r in range(rows):
        for c in range(columns):
            start = 0
            while start < size:
                if not mask[r, c, start]:
                    start += 1
                    continue
                end = start
                while end < size and mask[r, c, end]:
                    end += 1
                length = end - start + (OPEN if start == 0 or end == size else 0)
                for k in range(start, end):
                    lengths[r, c, k] = length
                    offsets[r, c, k] = k - start
                start = end
    return lengths, offsets


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, D, H, W) run lengths and offsets along D, H and W."""
    lengths, offsets = [], []
    for axis in range(3):
        along = np.ascontiguousarray(np.moveaxis(mask, axis, -1))
        length, offset = _runs_along_last_axis(along)
        lengths.append(np.moveaxis(length, -1, axis))
        offsets.append(np.moveaxis(offset, -1, axis))
    return np.ascontiguousarray(np.stack(lengths)), np.ascontiguousarray(np.stack(offsets))


@numba.njit(cache=True)
def _keep_middles(mask: np.ndarray, runs: np.ndarray, offsets: np.ndarray, thickness: np.ndarray) -> np.ndarray:
    """The middle voxel of every run whose axis is (one of) the thinnest at that voxel."""
    depth, height, width = mask.shape
    keep = np.zeros(mask.shape, np.bool_)
    for d in range(depth):
        for h in range(height):
            for w in range(width):
                if not mask[d, h, w]:
                    continue
                thinnest = min(thickness[0, d, h, w], thickness[1, d, h, w], thickness[2, d, h, w])
                for axis in range(3):
                    if thickness[axis, d, h, w] <= thinnest + 1e-3 and \
                            offsets[axis, d, h, w] == (runs[axis, d, h, w] % OPEN - 1) // 2:
                        keep[d, h, w] = True
    return keep


@numba.njit(cache=True)
def _local_thickness(mask: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """(3, D, H, W) float32 at the sheet voxels: each axis's run length averaged over the sheet
    voxels of the 3x3x3 neighbourhood (open runs count as :data:`OPEN` long).

    A one-voxel bump on a rasterised sheet has a run of 1 across the sheet's tangent; its
    neighbours' runs there are long, so the average points the bump to the sheet's true normal."""
    depth, height, width = mask.shape
    thickness = np.zeros(runs.shape, np.float32)
    for d in range(depth):
        for h in range(height):
            for w in range(width):
                if not mask[d, h, w]:
                    continue
                count = 0
                sums = np.zeros(3, np.float64)
                for i in range(max(d - 1, 0), min(d + 2, depth)):
                    for j in range(max(h - 1, 0), min(h + 2, height)):
                        for k in range(max(w - 1, 0), min(w + 2, width)):
                            if mask[i, j, k]:
                                count += 1
                                for axis in range(3):
                                    sums[axis] += runs[axis, i, j, k]
                for axis in range(3):
                    thickness[axis, d, h, w] = sums[axis] / count
    return thickness


@numba.njit(cache=True)
def _thicken(skeleton: np.ndarray, inside: np.ndarray, times: int) -> np.ndarray:
    """Dilate ``skeleton`` ``times`` by the 6-neighbour cross, never outside ``inside``."""
    depth, height, width = skeleton.shape
    grown = skeleton.copy()
    for _ in range(times):
        previous = grown.copy()
        for d in range(depth):
            for h in range(height):
                for w in range(width):
                    if not previous[d, h, w]:
                        continue
                    for dd, dh, dw in ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)):
                        i, j, k = d + dd, h + dh, w + dw
                        if 0 <= i < depth and 0 <= j < height and 0 <= k < width and inside[i, j, k]:
                            grown[i, j, k] = True
    return grown


def medial_surface(mask: np.ndarray) -> np.ndarray:
    """The medial surface of the sheets in a boolean (D, H, W) mask: a bool array, inside ``mask``."""
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if mask.ndim != 3:
        raise ValueError(f"medial_surface takes a (D, H, W) volume, got {mask.ndim} dimensions")
    if not mask.any():
        return np.zeros(mask.shape, np.bool_)
    runs, offsets = _runs(mask)
    return _keep_middles(mask, runs, offsets, _local_thickness(mask, runs))


def skeleton_target(label: np.ndarray, ignore_label: int | None = 2, thicken: int = 1) -> np.ndarray:
    """The skeleton-recall target of a label patch: uint8 0/1, the medial surface of the surface
    voxels (label 1) dilated ``thicken`` times by a 6-neighbour cross and kept inside the surface.

    Voxels of ``ignore_label`` are never part of it (the losses ignore them anyway).
    """
    surface = np.ascontiguousarray(np.asarray(label) == 1)
    skeleton = medial_surface(surface)
    if thicken > 0 and skeleton.any():
        skeleton = _thicken(skeleton, surface, thicken)
    return skeleton.view(np.uint8)


def warm_up() -> None:
    """Compile the kernels now (e.g. before DataLoader workers fork, so none of them compiles)."""
    skeleton_target(np.ones((2, 2, 2), np.uint8))
