"""Compiled kernels for the Betti numbers and the dimension-0 and dimension-2 matched counts.

Conventions (shared with :mod:`vesuvius_lab.core.metric.betti_dim1`): a tile has shape (n0, n1, n2),
voxel (x, y, z) has the raster index ``lin = (x*n1 + y)*n2 + z``, and voxels are the vertices of
a cubical complex. ``bg`` arrays are uint8, 1 where a voxel is background (value 1 of the
inverted masks the matching compares) and 0 where it is foreground.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def index_dtype(count: int) -> type:
    """The smaller integer type that can index ``count`` items (int32 halves memory traffic)."""
    return np.int32 if count < np.iinfo(np.int32).max else np.int64


@njit(cache=True, inline="always")
def find_root(parent, node):
    """Union-find root with path halving."""
    while parent[node] != node:
        parent[node] = parent[parent[node]]
        node = parent[node]
    return node


@njit(cache=True, inline="always")
def link_roots(parent, rank, root_a, root_b):
    """Union by rank of two distinct roots; returns the surviving root."""
    if rank[root_a] < rank[root_b]:
        root_a, root_b = root_b, root_a
    parent[root_b] = root_a
    if rank[root_a] == rank[root_b]:
        rank[root_a] += 1
    return root_a


@njit(cache=True)
def tag_union_classes(union_labels, fg_a, fg_b, n_union, tags):
    """Tag each class of the union (bit 1: holds a voxel of the first mask, bit 2: of the second) and
    return how many classes hold each mask's voxels."""
    n0, n1, n2 = union_labels.shape
    for x in range(n0):
        for y in range(n1):
            for z in range(n2):
                label = union_labels[x, y, z]
                if label:
                    tags[label - 1] |= (1 if fg_a[x, y, z] else 0) | (2 if fg_b[x, y, z] else 0)
    classes_with_a = 0
    classes_with_b = 0
    for i in range(n_union):
        classes_with_a += tags[i] & 1
        classes_with_b += tags[i] >> 1
    return classes_with_a, classes_with_b


@njit(cache=True)
def join_classes(parent, rank, tags, a, b):
    """Join the classes of ``a`` and ``b`` (tag bit 1: holds an element of the first volume, bit 2: of
    the second). Returns (1 when a class of both met another of both, 1 when two classes of the first
    volume became one, the same for the second); (0, 0, 0) when they were one class already."""
    root_a = find_root(parent, a)
    root_b = find_root(parent, b)
    if root_a == root_b:
        return 0, 0, 0
    tag_a, tag_b = tags[root_a], tags[root_b]
    root = link_roots(parent, rank, root_a, root_b)
    tags[root] = tag_a | tag_b
    return int(tag_a == 3 and tag_b == 3), int((tag_a & 1) & (tag_b & 1)), int((tag_a >> 1) & (tag_b >> 1))


@njit(cache=True)
def euler_characteristic(fg):
    """V - E + S - Q of the complex of cells whose corners are all foreground (fg: uint8 3D)."""
    n0, n1, n2 = fg.shape
    chi = 0
    for x in range(n0):
        for y in range(n1):
            for z in range(n2):
                if not fg[x, y, z]:
                    continue
                ex = x + 1 < n0 and fg[x + 1, y, z] != 0
                ey = y + 1 < n1 and fg[x, y + 1, z] != 0
                ez = z + 1 < n2 and fg[x, y, z + 1] != 0
                sxy = ex and ey and fg[x + 1, y + 1, z] != 0
                sxz = ex and ez and fg[x + 1, y, z + 1] != 0
                syz = ey and ez and fg[x, y + 1, z + 1] != 0
                cube = sxy and sxz and syz and fg[x + 1, y + 1, z + 1] != 0
                chi += 1 - (int(ex) + int(ey) + int(ez)) + (int(sxy) + int(sxz) + int(syz)) - int(cube)
    return chi


@njit(cache=True)
def matched_dim0(fg_a, fg_b, union_labels, n_union, parent):
    """m_0: merges of two classes that both hold A and B foreground, edges in increasing id.

    ``union_labels`` are the 6-connected components (1..n_union) of the union of both
    foregrounds, 0 on the common background. Each component starts as one class tagged with
    bit 1 (has A foreground) and bit 2 (has B foreground); every common-background voxel starts
    as its own untagged class. Edges with a common-background endpoint are then added in
    increasing id (raster order of the lower endpoint, then axis). ``parent`` is the identity
    over the n_union + voxel-count nodes (components first, then voxels by raster index).
    """
    n0, n1, n2 = fg_a.shape
    n_vox = n0 * n1 * n2
    rank = np.zeros(n_union + n_vox, np.uint8)
    tags = np.zeros(n_union + n_vox, np.uint8)
    classes_with_a, classes_with_b = tag_union_classes(union_labels, fg_a, fg_b, n_union, tags)
    matched = 0
    for x in range(n0):
        for y in range(n1):
            for z in range(n2):
                # a match needs two classes holding A (and two holding B): stop when it cannot happen
                if classes_with_a < 2 or classes_with_b < 2:
                    return matched
                label = union_labels[x, y, z]
                lin = (x * n1 + y) * n2 + z
                node = label - 1 if label else n_union + lin
                for axis in range(3):
                    if axis == 0:
                        if x + 1 >= n0:
                            continue
                        other_label = union_labels[x + 1, y, z]
                        other_lin = lin + n1 * n2
                    elif axis == 1:
                        if y + 1 >= n1:
                            continue
                        other_label = union_labels[x, y + 1, z]
                        other_lin = lin + n2
                    else:
                        if z + 1 >= n2:
                            continue
                        other_label = union_labels[x, y, z + 1]
                        other_lin = lin + 1
                    if label and other_label:
                        continue  # both endpoints in the union: already one class
                    other = other_label - 1 if other_label else n_union + other_lin
                    joined, with_a, with_b = join_classes(parent, rank, tags, node, other)
                    matched += joined
                    classes_with_a -= with_a
                    classes_with_b -= with_b
    return matched


@njit(cache=True)
def cavity_flags(labels, n_labels):
    """Per label (index 0..n_labels), True when the component touches no face of the tile."""
    n0, n1, n2 = labels.shape
    flags = np.ones(n_labels + 1, np.bool_)
    flags[0] = False
    for x in range(n0):
        for y in range(n1):
            for z in range(n2):
                if x == 0 or y == 0 or z == 0 or x == n0 - 1 or y == n1 - 1 or z == n2 - 1:
                    flags[labels[x, y, z]] = False
    return flags


@njit(cache=True)
def matched_dim2(labels_a, cavity_a, labels_b, cavity_b, labels_c, n_c):
    """m_2: common-background components holding the last common-background voxel of a cavity of
    A and of a cavity of B (``labels_*``: 26-connected background components)."""
    n0, n1, n2 = labels_c.shape
    seen_a = np.zeros(cavity_a.size, np.bool_)
    seen_b = np.zeros(cavity_b.size, np.bool_)
    marked_a = np.zeros(n_c + 1, np.bool_)
    marked_b = np.zeros(n_c + 1, np.bool_)
    for x in range(n0 - 1, -1, -1):
        for y in range(n1 - 1, -1, -1):
            for z in range(n2 - 1, -1, -1):
                c = labels_c[x, y, z]
                if c == 0:
                    continue
                la, lb = labels_a[x, y, z], labels_b[x, y, z]
                if cavity_a[la] and not seen_a[la]:
                    seen_a[la] = True
                    marked_a[c] = True
                if cavity_b[lb] and not seen_b[lb]:
                    seen_b[lb] = True
                    marked_b[c] = True
    matched = 0
    for c in range(1, n_c + 1):
        if marked_a[c] and marked_b[c]:
            matched += 1
    return matched
