"""Betti matching counts between two binary volumes, as the competition's TopoScore uses them.

For each homology dimension k = 0, 1, 2 the matching yields (m_k, p_k, g_k): m_k matched
features, p_k = m_k + unmatched features of the prediction, g_k = m_k + unmatched features of the
label (finite bars only). The numbers equal those of the Betti-Matching-3D library
(``compute_matching(a, b)``, Stucki et al. 2024) on binary input, tie-breaking included: the
library's filtrations order cells by (value, id), and for 0/1 input each rule below reduces to
a pass over the cells in id order, stated where it is computed.

* p_k, g_k depend only on each input: Betti numbers of its foreground (6-connected) complex.
* m_0: :func:`vesuvius_lab.core.metric.betti_kernels.matched_dim0` (union-find in edge order).
* m_1: :func:`vesuvius_lab.core.metric.betti_dim1.matched_dim1` (projected column reductions).
* m_2: :func:`vesuvius_lab.core.metric.betti_kernels.matched_dim2` (cavities and their last voxel).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

#: (matched, prediction features, label features) per homology dimension 0, 1, 2.
BettiCounts = dict[int, tuple[int, int, int]]

DIMENSIONS = (0, 1, 2)


@dataclass
class _Background:
    """One input's background: its 26-connected components and which of them are cavities."""

    mask: np.ndarray  # uint8, 1 = background
    labels: np.ndarray
    cavity: np.ndarray  # bool per label


@contextmanager
def timed(timings: dict[str, float] | None, key: str) -> Iterator[None]:
    """Add the CPU seconds of the block to ``timings[key]`` (nothing when timings is None)."""
    start = time.process_time()
    try:
        yield
    finally:
        if timings is not None:
            timings[key] = timings.get(key, 0.0) + time.process_time() - start


def betti_counts(a: np.ndarray, b: np.ndarray, *, timings: dict[str, float] | None = None) -> BettiCounts:
    """Matching counts of one tile, with the library's convention: ``a`` (prediction) and ``b``
    (label) hold 0 for foreground and 1 for background.

    ``timings``, when given, accumulates CPU seconds per stage ("betti_numbers", "dim0",
    "dim1", "dim2").
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"betti_counts needs two 3D arrays of one shape, got {a.shape} and {b.shape}")
    for name, array in (("a", a), ("b", b)):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"betti_counts: {name} must hold only 0 (foreground) and 1 (background)")
    return _tile_counts(a == 0, b == 0, timings)


def tile_slices(shape: tuple[int, ...]) -> list[tuple[slice, slice, slice]]:
    """The 2x2x2 split of a volume: along each axis the first half gets the extra voxel."""
    halves = []
    for n in shape:
        middle = (n + 1) // 2
        halves.append((slice(0, middle), slice(middle, n)))
    return [(s0, s1, s2) for s0 in halves[0] for s1 in halves[1] for s2 in halves[2]]


def tiled_betti_counts(pred_fg: np.ndarray, label_fg: np.ndarray, *,
                       timings: dict[str, float] | None = None) -> BettiCounts:
    """Counts summed over the 8 tiles of the 2x2x2 split (foreground masks: True = surface)."""
    if pred_fg.shape != label_fg.shape or pred_fg.ndim != 3:
        raise ValueError(f"tiled_betti_counts needs two 3D masks of one shape, got {pred_fg.shape} "
                         f"and {label_fg.shape}")
    total = {k: (0, 0, 0) for k in DIMENSIONS}
    for tile in tile_slices(pred_fg.shape):
        pred_tile, label_tile = pred_fg[tile], label_fg[tile]
        if pred_tile.size == 0:
            continue
        counts = _tile_counts(pred_tile, label_tile, timings)
        total = {k: tuple(x + y for x, y in zip(total[k], counts[k])) for k in DIMENSIONS}
    return total


def _tile_counts(fg_a: np.ndarray, fg_b: np.ndarray, timings: dict[str, float] | None) -> BettiCounts:
    from vesuvius_lab.core.metric.betti_dim1 import matched_dim1

    fg_a = np.ascontiguousarray(fg_a, dtype=bool).view(np.uint8)
    fg_b = np.ascontiguousarray(fg_b, dtype=bool).view(np.uint8)
    with timed(timings, "betti_numbers"):
        betti_a, bg_a = _betti_numbers(fg_a)
        betti_b, bg_b = _betti_numbers(fg_b)
    # finite bars only: the component that never dies is not a feature
    p = [max(betti_a[0] - 1, 0), betti_a[1], betti_a[2]]
    g = [max(betti_b[0] - 1, 0), betti_b[1], betti_b[2]]
    m = [0, 0, 0]  # m_k <= min(p_k, g_k): skip the work when that is 0
    if min(p[0], g[0]) > 0:
        with timed(timings, "dim0"):
            m[0] = _matched_dim0(fg_a, fg_b)
    if min(p[2], g[2]) > 0:
        with timed(timings, "dim2"):
            m[2] = _matched_dim2(bg_a, bg_b)
    if min(p[1], g[1]) > 0:
        with timed(timings, "dim1"):
            m[1] = matched_dim1(bg_a.mask, bg_b.mask, bg_a.mask & bg_b.mask)
    return {k: (m[k], p[k], g[k]) for k in DIMENSIONS}


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    import cc3d

    labels, count = cc3d.connected_components(mask, connectivity=connectivity, return_N=True, out_dtype=np.uint32)
    return labels, int(count)


def _betti_numbers(fg: np.ndarray) -> tuple[tuple[int, int, int], _Background]:
    """(beta_0, beta_1, beta_2) of the foreground complex (6-connected foreground, 26-connected
    background), and the background components that m_2 reuses."""
    from vesuvius_lab.core.metric.betti_kernels import cavity_flags, euler_characteristic

    beta0 = _components(fg, 6)[1]
    bg = (fg == 0).view(np.uint8)
    labels, n_bg = _components(bg, 26)
    cavity = cavity_flags(labels, n_bg)  # background components touching no face of the tile
    beta2 = int(np.count_nonzero(cavity))
    beta1 = beta0 + beta2 - int(euler_characteristic(fg))
    return (beta0, beta1, beta2), _Background(bg, labels, cavity)


def _matched_dim0(fg_a: np.ndarray, fg_b: np.ndarray) -> int:
    from vesuvius_lab.core.metric.betti_kernels import index_dtype, matched_dim0

    union_labels, n_union = _components(fg_a | fg_b, 6)
    n_nodes = n_union + fg_a.size
    parent = np.arange(n_nodes, dtype=index_dtype(n_nodes))
    return int(matched_dim0(fg_a, fg_b, union_labels, n_union, parent))


def _matched_dim2(bg_a: _Background, bg_b: _Background) -> int:
    from vesuvius_lab.core.metric.betti_kernels import matched_dim2

    labels_c, n_c = _components(bg_a.mask & bg_b.mask, 26)
    return int(matched_dim2(bg_a.labels, bg_a.cavity, bg_b.labels, bg_b.cavity, labels_c, n_c))
