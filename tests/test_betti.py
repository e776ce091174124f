"""Betti matching counts: the library's numbers on the conformance tiles, and two slow references.

The references work straight from the definitions on tiny volumes, in plain Python:
* p_k, g_k: Betti numbers from the ranks of the boundary matrices over Z/2;
* m_1: the rule as stated in ``core/betti_dim1.py`` (every negative square of the comparison
  filtration reduced in order), where the fast code replaces the value-0 block by a cheaper basis
  of the same span.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import conformance_arrays, conformance_expected

from vesuvius_lab.core.metric.betti import betti_counts, tile_slices, tiled_betti_counts
from vesuvius_lab.core.metric.betti_dim1 import matched_dim1

TILE_CASES = conformance_expected("betti_tile")


@pytest.fixture(scope="module")
def tile_arrays():
    return conformance_arrays("betti_tile")


@pytest.mark.parametrize("name", sorted(TILE_CASES))
def test_tile_counts_equal_the_library(name, tile_arrays):
    expected = TILE_CASES[name]
    got = betti_counts(tile_arrays[f"{name}__a"], tile_arrays[f"{name}__b"])
    want = {k: (expected[f"dim{k}"]["matched"], expected[f"dim{k}"]["a"], expected[f"dim{k}"]["b"]) for k in (0, 1, 2)}
    assert got == want


def test_flipped_tiles_change_the_matched_counts(tile_arrays):
    """The tie-breaking cases really differ, so the test above checks the cell order."""
    m2 = [TILE_CASES[f"order_dim2_flip{axis}"]["dim2"]["matched"] for axis in range(3)]
    assert m2 == [1, 2, 1]
    assert TILE_CASES["order_dim0_line"]["dim0"]["matched"] != TILE_CASES["order_dim0_line_mirrored"]["dim0"]["matched"]
    a, b = tile_arrays["order_dim0_line__a"], tile_arrays["order_dim0_line__b"]
    assert betti_counts(a, b)[0] != betti_counts(a[..., ::-1], b[..., ::-1])[0]


# --------------------------------------------------------------------------- references


def _cells(shape):
    """Vertices, edges, squares, cubes of the full grid: (id, corner voxels, boundary ids)."""
    n0, n1, n2 = shape

    def lin(v):
        return (v[0] * n1 + v[1]) * n2 + v[2]

    def inside(v):
        return all(0 <= c < n for c, n in zip(v, shape))

    unit = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    add = lambda v, *us: tuple(c + sum(u[i] for u in us) for i, c in enumerate(v))  # noqa: E731
    voxels = [(x, y, z) for x in range(n0) for y in range(n1) for z in range(n2)]
    edges, squares, cubes = [], [], []
    for v in voxels:
        for t in range(3):
            if inside(add(v, unit[t])):
                edges.append((3 * lin(v) + t, (v, add(v, unit[t])), (lin(v), lin(add(v, unit[t])))))
            a, b = [axis for axis in range(3) if axis != t]
            if inside(add(v, unit[a], unit[b])):
                corners = (v, add(v, unit[a]), add(v, unit[b]), add(v, unit[a], unit[b]))
                boundary = (3 * lin(v) + a, 3 * lin(v) + b, 3 * lin(add(v, unit[b])) + a, 3 * lin(add(v, unit[a])) + b)
                squares.append((3 * lin(v) + t, corners, boundary, t))
        if inside(add(v, *unit)):
            corners = [add(v, *[unit[i] for i in range(3) if bits >> i & 1]) for bits in range(8)]
            boundary = []
            for t in range(3):  # the two faces with normal t
                boundary += [3 * lin(v) + t, 3 * lin(add(v, unit[t])) + t]
            cubes.append((v, corners, boundary))
    return voxels, edges, squares, cubes


def _rank(columns):
    """Rank over Z/2 of columns given as int bitsets."""
    pivots = {}
    for col in columns:
        while col:
            top = col.bit_length() - 1
            if top not in pivots:
                pivots[top] = col
                break
            col ^= pivots[top]
    return len(pivots)


def _bits(ids):
    value = 0
    for i in ids:
        value ^= 1 << i
    return value


def reference_betti(fg: np.ndarray) -> tuple[int, int, int]:
    """Betti numbers of the complex of cells whose corners are all foreground."""
    voxels, edges, squares, cubes = _cells(fg.shape)
    on = lambda corners: all(fg[c] for c in corners)  # noqa: E731
    vertex_count = int(fg.sum())
    edge_cols = [_bits(ends) for _, corners, ends in edges if on(corners)]
    square_cols = [_bits(bd) for _, corners, bd, _ in squares if on(corners)]
    cube_cols = [_bits(bd) for _, corners, bd in cubes if on(corners)]
    r1, r2, r3 = _rank(edge_cols), _rank(square_cols), _rank(cube_cols)
    return vertex_count - r1, len(edge_cols) - r1 - r2, len(square_cols) - r2 - r3


def reference_m1(bg_a: np.ndarray, bg_b: np.ndarray) -> int:
    """m_1 by the rule as stated, on 0/1 background masks: negative squares of the comparison
    filtration (dual union-find, decreasing (value, id)), then per input a Z/2 reduction of
    their projected boundaries in increasing (value, id); count the value-1 squares that reduce
    to zero for both inputs."""
    shape = bg_a.shape
    bg_c = bg_a & bg_b
    _, _, squares, _ = _cells(shape)
    value = lambda bg, corners: int(any(bg[c] for c in corners))  # noqa: E731
    m = [max(n - 1, 0) for n in shape]
    cube = lambda v: (v[0] * m[1] + v[1]) * m[2] + v[2]  # noqa: E731
    outside = m[0] * m[1] * m[2]
    parent = list(range(outside + 1))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    negative = set()
    for sid, corners, _, t in sorted(squares, key=lambda s: (value(bg_c, s[1]), s[0]), reverse=True):
        v = corners[0]
        below = cube(tuple(c - (i == t) for i, c in enumerate(v))) if v[t] > 0 else outside
        above = cube(v) if v[t] < shape[t] - 1 else outside
        ra, rb = find(below), find(above)
        if ra == rb:
            negative.add(sid)
        else:
            parent[ra] = rb

    def zero_columns(bg):
        owners, zero = {}, set()
        for sid, corners, boundary, t in sorted(squares, key=lambda s: (value(bg_c, s[1]), s[0])):
            if sid not in negative or not value(bg, corners):
                continue
            # the boundary edges of X-value 1, from the square's corners
            c0, ca, cb, cab = (bg[c] for c in corners)
            rows = [e for e, keep in zip(boundary, (c0 | ca, c0 | cb, cb | cab, ca | cab)) if keep]
            col = _bits(rows)
            while col and (col.bit_length() - 1) in owners:
                col ^= owners[col.bit_length() - 1]
            if col:
                owners[col.bit_length() - 1] = col
            elif value(bg_c, corners):
                zero.add(sid)
        return zero

    return len(zero_columns(bg_a) & zero_columns(bg_b))


def random_pairs(count: int, seed: int, max_side: int = 7):
    """Tiny binary foreground pairs: independent noise, correlated noise, dense (cavities)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = tuple(int(s) for s in rng.integers(2, max_side + 1, 3))
        kind = i % 3
        if kind == 0:
            fg_a, fg_b = rng.random(shape) < 0.5, rng.random(shape) < 0.5
        elif kind == 1:
            fg_a = rng.random(shape) < 0.55
            fg_b = fg_a ^ (rng.random(shape) < 0.15)
        else:
            fg_a, fg_b = rng.random(shape) < 0.88, rng.random(shape) < 0.88
        yield fg_a, fg_b


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_counts_equal_betti_numbers_from_ranks(seed):
    checked_dims = set()
    for fg_a, fg_b in random_pairs(30, seed):
        counts = betti_counts((~fg_a).astype(np.uint8), (~fg_b).astype(np.uint8))
        for side, fg in ((1, fg_a), (2, fg_b)):
            beta = reference_betti(fg)
            expected = (max(beta[0] - 1, 0), beta[1], beta[2])
            assert tuple(counts[k][side] for k in (0, 1, 2)) == expected
            checked_dims |= {k for k in (0, 1, 2) if expected[k]}
    assert checked_dims == {0, 1, 2}  # the random volumes did exercise every dimension


@pytest.mark.parametrize("seed", [0, 1])
def test_matched_dim1_equals_the_rule_as_written(seed):
    nonzero, order_sensitive = 0, 0
    for fg_a, fg_b in random_pairs(30, seed):
        per_flip = set()
        for flip in (None, 0, 2):  # mirrored copies break ties differently
            a, b = (fg_a, fg_b) if flip is None else (np.flip(fg_a, flip), np.flip(fg_b, flip))
            bg_a, bg_b = np.ascontiguousarray(~a).view(np.uint8), np.ascontiguousarray(~b).view(np.uint8)
            expected = reference_m1(bg_a, bg_b)
            assert matched_dim1(bg_a, bg_b, bg_a & bg_b) == expected
            nonzero += expected > 0
            per_flip.add(expected)
        order_sensitive += len(per_flip) > 1
    assert nonzero > 10 and order_sensitive > 0  # the cases exercise matching and its tie-breaking


# --------------------------------------------------------------------------- edge cases and tiling


def test_hollow_box_has_a_cavity_and_matches_itself():
    fg = np.zeros((7, 7, 7), bool)
    fg[1:6, 1:6, 1:6] = True
    fg[2:5, 2:5, 2:5] = False
    a = (~fg).astype(np.uint8)
    assert betti_counts(a, a) == {0: (0, 0, 0), 1: (0, 0, 0), 2: (1, 1, 1)}


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 6, 5), (4, 1, 4), (3, 3, 1)])
def test_thin_and_single_voxel_volumes(shape):
    rng = np.random.default_rng(3)
    fg_a, fg_b = rng.random(shape) < 0.5, rng.random(shape) < 0.5
    counts = betti_counts((~fg_a).astype(np.uint8), (~fg_b).astype(np.uint8))
    assert counts[2] == (0, 0, 0)  # no cavity fits when a side has length 1
    for side, fg in ((1, fg_a), (2, fg_b)):
        beta = reference_betti(fg)
        assert (counts[0][side], counts[1][side]) == (max(beta[0] - 1, 0), beta[1])


def test_empty_and_full_inputs():
    empty = np.ones((6, 6, 6), np.uint8)  # all background
    full = np.zeros((6, 6, 6), np.uint8)
    blobs = empty.copy()
    blobs[1, 1, 1] = blobs[4, 4, 4] = 0
    assert betti_counts(empty, empty) == {0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0)}
    assert betti_counts(blobs, empty) == {0: (0, 1, 0), 1: (0, 0, 0), 2: (0, 0, 0)}
    assert betti_counts(full, blobs) == {0: (0, 0, 1), 1: (0, 0, 0), 2: (0, 0, 0)}


def test_inputs_must_be_binary_and_of_one_shape():
    with pytest.raises(ValueError, match="only 0"):
        betti_counts(np.full((3, 3, 3), 2, np.uint8), np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="one shape"):
        betti_counts(np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3, 4), np.uint8))


@pytest.mark.parametrize("shape", [(37, 29, 41), (2, 3, 1), (8, 8, 8)])
def test_tiles_cover_the_volume_once_with_halves_one_voxel_apart(shape):
    cover = np.zeros(shape, np.int32)
    tiles = tile_slices(shape)
    assert len(tiles) == 8
    for tile in tiles:
        cover[tile] += 1
    assert (cover == 1).all()
    for axis, n in enumerate(shape):
        first, second = tiles[0][axis], tiles[-1][axis]
        assert first.stop - first.start == (n + 1) // 2 and second.stop - second.start == n // 2


def test_tiled_counts_are_the_sums_over_tiles():
    rng = np.random.default_rng(5)
    pred, label = rng.random((9, 10, 11)) < 0.5, rng.random((9, 10, 11)) < 0.5
    total = {k: np.zeros(3, int) for k in (0, 1, 2)}
    for tile in tile_slices(pred.shape):
        counts = betti_counts((~pred[tile]).astype(np.uint8), (~label[tile]).astype(np.uint8))
        for k in total:
            total[k] += counts[k]
    assert tiled_betti_counts(pred, label) == {k: tuple(int(x) for x in v) for k, v in total.items()}
