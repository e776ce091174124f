"""m_0 with the union-find reduced to the events that can change it; equal to ``betti_kernels.matched_dim0``.

The rule (TOPOSCORE.md section 2): the 6-connected components of the union of both foregrounds
start as classes tagged with which inputs they hold, every common-background voxel as an untagged
class; the edges with a common-background endpoint are added in increasing id (raster order of the
lower endpoint, then axis 0, 1, 2), and m_0 counts the merges of two classes that both hold A and B
foreground. Two facts about that order remove almost all of the work:

* An edge along axis 1 or 2 whose lower endpoint v has x >= 1 never merges: with the voxels
  v - u0 and v - u0 + u_t it closes a square whose other three edges, (v-u0, 0), (v-u0, t) and
  (v-u0+u_t, 0), have smaller ids, so its endpoints are already in one class (an edge between two
  union voxels is inside one component from the start).
* When the axis-0 edge (v, 0) is added, v + u0 has met no other edge yet (every other edge at it
  has a larger id), so unless v + u0 is in the union it only joins v's class, untagged.

So a background voxel above x = 0 is in the class of the voxel below it at the moment that matters,
each column (y, z) carries one class upwards, and the only merges are at x = 0 (all three axes,
with a node per voxel of that slab) and where a background voxel has a union voxel just above it.
Merges of an untagged singleton never count and change no tag, so leaving them out changes
neither m_0 nor the early stop (fewer than two classes hold A, or B).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vesuvius_lab.core.metric.betti_kernels import join_classes, tag_union_classes


@njit(cache=True)
def matched_dim0_runs(fg_a, fg_b, union_labels, n_union):
    """m_0 of one tile (see the module docstring); arguments as for ``matched_dim0`` less ``parent``."""
    n0, n1, n2 = fg_a.shape
    n_nodes = n_union + n1 * n2  # the union's components, then the voxels of the slab x = 0
    parent = np.arange(n_nodes)
    rank = np.zeros(n_nodes, np.uint8)
    tags = np.zeros(n_nodes, np.uint8)
    classes_with_a, classes_with_b = tag_union_classes(union_labels, fg_a, fg_b, n_union, tags)
    column = np.empty(n1 * n2, np.int64)  # the class node of the voxel below, per column (y, z)
    matched = 0
    for x in range(n0):
        for y in range(n1):
            for z in range(n2):
                if classes_with_a < 2 or classes_with_b < 2:
                    return matched
                c = y * n2 + z
                label = union_labels[x, y, z]
                if label:
                    node = label - 1
                elif x == 0:
                    node = n_union + c
                else:
                    node = column[c]
                column[c] = node
                for axis in range(3):
                    if axis == 0:
                        if x + 1 >= n0 or label:
                            continue
                        other_label = union_labels[x + 1, y, z]
                        if not other_label:
                            continue  # v + u0 joins this class: it inherits the column's node
                        other = other_label - 1
                    else:
                        if x > 0:
                            break
                        if axis == 1:
                            if y + 1 >= n1:
                                continue
                            other_label = union_labels[x, y + 1, z]
                            other_c = c + n2
                        else:
                            if z + 1 >= n2:
                                continue
                            other_label = union_labels[x, y, z + 1]
                            other_c = c + 1
                        if label and other_label:
                            continue
                        other = other_label - 1 if other_label else n_union + other_c
                    joined, with_a, with_b = join_classes(parent, rank, tags, node, other)
                    matched += joined
                    classes_with_a -= with_a
                    classes_with_b -= with_b
    return matched


def matched_dim0_fast(fg_a: np.ndarray, fg_b: np.ndarray) -> int:
    """``betti._matched_dim0`` (uint8 foreground masks of one tile) by :func:`matched_dim0_runs`."""
    from vesuvius_lab.core.metric.betti import _components

    union_labels, n_union = _components(fg_a | fg_b, 6)
    return int(matched_dim0_runs(fg_a, fg_b, union_labels, n_union))
