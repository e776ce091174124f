"""How a repaired sheet mask joins the mask it repairs.

A hole stitcher proposes voxels to add to a mask. Added blindly they thicken sheets, bridge
neighbouring sheets and half-fill holes; a half-filled hole (a plug held by two bridges) has more
tunnels than the hole had, so each costs more topology than it repairs. The rules:

  ``topology``  each 6-connected group of proposed voxels is kept only if it touches exactly one
                connected component of the mask and raises the mask's Euler characteristic: it
                closes more tunnels than it opens and joins nothing that was apart (default)
  ``near``      proposed voxels within ``max_distance`` 6-connected steps of the mask
  ``union``     every proposed voxel
  ``replace``   the stitched mask alone

Connectivity follows the competition metric: foreground 6-connected, background 26-connected.
Used by the ``hole_stitching_unet`` post-processing step and by validation of the hole-stitching
task, so a stitcher's run records the score its step will give.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

MergeRule = Literal["topology", "near", "union", "replace"]
MERGE_RULES: tuple[str, ...] = ("topology", "near", "union", "replace")


def merge_stitched(mask: np.ndarray, stitched: np.ndarray, rule: MergeRule = "topology",
                   max_distance: int = 8) -> np.ndarray:
    """uint8 {0, 1}: ``mask`` (nonzero = sheet) with the voxels of ``stitched`` that ``rule`` keeps."""
    from scipy import ndimage

    if rule not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {rule!r}; choose one of {', '.join(MERGE_RULES)}")
    if rule == "replace":
        return (stitched != 0).astype(np.uint8)
    mask = mask != 0
    added = (stitched != 0) & ~mask
    if rule == "near":
        added &= ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1), iterations=max_distance)
    if rule == "topology":
        return close_tunnels(mask, added)
    return (mask | added).astype(np.uint8)


def close_tunnels(mask: np.ndarray, proposed: np.ndarray) -> np.ndarray:
    """``mask`` plus each 6-connected group of ``proposed`` voxels that touches exactly one component of
    the mask and raises its Euler characteristic (see the module's ``topology`` rule).

    Groups are taken one at a time against the mask grown so far, so diagonal neighbours that are
    accepted together are judged together. The Euler characteristic changes only in the 2x2x2 cells
    a group touches, so each group is judged in its bounding box grown by two voxels.
    """
    import cc3d
    from scipy import ndimage
    from skimage.measure import euler_number

    out = np.array(mask, dtype=bool)
    components = cc3d.connected_components(out, connectivity=6)
    groups = cc3d.connected_components(proposed & ~out, connectivity=6)
    cross = ndimage.generate_binary_structure(3, 1)
    for index, bounds in enumerate(ndimage.find_objects(groups), start=1):
        if bounds is None:
            continue
        box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in bounds)
        group, current = groups[box] == index, out[box]
        touched = np.unique(components[box][ndimage.binary_dilation(group, cross) & current])
        if len(touched) != 1:
            continue  # floating (dust) or joining sheets that were apart
        grown = current | group
        # With the components unchanged, Euler characteristic minus cavities rises exactly when tunnels close.
        closed = (euler_number(grown, connectivity=1) - _cavities(grown)) - (euler_number(current, connectivity=1)
                                                                             - _cavities(current))
        if closed <= 0:
            continue  # closes no tunnel, or opens as many as it closes
        out[box] |= group
        components[box][group] = touched[0]
    return out.astype(np.uint8)


def _cavities(box: np.ndarray) -> int:
    """Background components (26-connected) of ``box`` that touch none of its faces."""
    import cc3d

    background = cc3d.connected_components(~box, connectivity=26)
    faces = [background[0], background[-1], background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]]
    return int(background.max()) - len(np.setdiff1d(np.unique(np.concatenate([f.ravel() for f in faces])), [0]))
