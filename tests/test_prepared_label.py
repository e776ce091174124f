"""A prepared label scores exactly like ``score_volume``: every field, floats bit for bit, Betti counts
exact; and the kernels it uses equal the ones ``score_volume`` uses, tile by tile."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import conformance_arrays, conformance_expected

from vesuvius_lab.core.metric.betti import _betti_numbers, _matched_dim0, tile_slices
from vesuvius_lab.core.metric.betti_dim0_runs import matched_dim0_fast
from vesuvius_lab.core.metric.betti_dim1 import matched_dim1
from vesuvius_lab.core.metric.betti_linking import (MAX_LINK_BITS, Scratch, killing_chains, matched_dim1_fast,
                                                    matched_dim1_linked)
from vesuvius_lab.core.metric.prepared import PreparedLabel
from vesuvius_lab.core.metric.score import VolumeScore, score_volume

METRIC_CASES = conformance_expected("metric")
TILE_CASES = conformance_expected("betti_tile")


def assert_same(got: VolumeScore, want: VolumeScore) -> None:
    """Exact equality, field by field (the message names the field that differs)."""
    assert got.betti == want.betti
    for name in ("score", "topo_score", "surface_dice", "voi_score", "voi_split", "voi_merge"):
        assert getattr(got, name) == getattr(want, name), name
    assert got == want


def check(pred: np.ndarray, label: np.ndarray, ignore_label: int | None = 2) -> VolumeScore:
    want = score_volume(pred, label, ignore_label=ignore_label)
    got = PreparedLabel.from_label(label, ignore_label=ignore_label).score(pred)
    assert_same(got, want)
    return got


@pytest.fixture(scope="module")
def metric_arrays():
    return conformance_arrays("metric")


@pytest.mark.parametrize("ignore_label", [2, None])
@pytest.mark.parametrize("name", sorted(METRIC_CASES))
def test_conformance_cases(name, ignore_label, metric_arrays):
    check(metric_arrays[f"{name}__pred"], metric_arrays[f"{name}__label"], ignore_label)


def sheets_label(shape, rng, ignore: bool = True) -> np.ndarray:
    """Wavy sheets with holes, an ignored slab and an ignored face band (when ``ignore``)."""
    n0, n1, n2 = shape
    x = np.arange(n0)[:, None, None]
    yy, zz = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
    label = np.zeros(shape, np.uint8)
    for centre in np.arange(4, n0, 9):
        surface = centre + 2 * np.sin(rng.uniform(0.1, 0.4) * yy + rng.uniform(0, 6)) * np.cos(
            rng.uniform(0.1, 0.4) * zz)
        label[np.abs(x - surface[None]) < 1.5] = 1
    for _ in range(int(np.prod(shape) / 800)):  # holes: tunnels of the label
        c = rng.integers(0, shape, 3)
        label[tuple(slice(max(int(ci) - 1, 0), int(ci) + 2) for ci in c)] = 0
    if ignore:
        label[:, :, : n2 // 4][label[:, :, : n2 // 4] == 0] = 2
        label[:2] = 2
    return label


def noisy_predictions(label: np.ndarray, rng):
    """A few ways to get a label wrong: flips, dust, erosion, shifts, noise, a blob, inversion."""
    from scipy import ndimage

    fg = label == 1
    yield fg ^ (rng.random(fg.shape) < 0.02)
    yield (fg | (rng.random(fg.shape) < 0.01)) & ~(rng.random(fg.shape) < 0.05)
    yield ndimage.binary_erosion(fg) | ndimage.binary_dilation(rng.random(fg.shape) < 0.002, iterations=2)
    yield np.roll(fg, 1, axis=int(rng.integers(0, 3))).astype(np.float32) * rng.uniform(0.5, 1.0, fg.shape)
    yield rng.random(fg.shape) < 0.5
    blob = fg.copy()
    blob[tuple(slice(s // 3, 2 * s // 3) for s in fg.shape)] = True
    yield blob
    yield ~fg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_noisy_predictions(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(17, 34, 3))
    label = sheets_label(shape, rng, ignore=seed != 1)
    prepared = PreparedLabel.from_label(label)
    for pred in noisy_predictions(label, rng):
        assert_same(prepared.score(pred), score_volume(pred, label))
    for ignore_label in (None, 1):  # no ignore label; another value ignored
        prepared = PreparedLabel.from_label(label, ignore_label=ignore_label)
        for pred in list(noisy_predictions(label, rng))[:3]:
            assert_same(prepared.score(pred), score_volume(pred, label, ignore_label=ignore_label))


def test_random_blobs_touching_the_faces():
    """Smooth random masks (surface on every face, cavities, odd shapes), the ignore label inside."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    for _ in range(12):
        shape = tuple(int(s) for s in rng.integers(5, 26, 3))
        field = ndimage.gaussian_filter(rng.random(shape), 1.2)
        label = (field > np.quantile(field, rng.uniform(0.3, 0.8))).astype(np.uint8)
        label[rng.random(shape) < 0.05] = 2
        pred = (field + 0.05 * rng.standard_normal(shape)) > np.quantile(field, rng.uniform(0.3, 0.8))
        check(pred, label)
        check(pred, label, None)


def test_empty_predictions_and_labels():
    rng = np.random.default_rng(3)
    shape = (19, 22, 17)
    label = sheets_label(shape, rng)
    empty = np.zeros(shape, np.uint8)
    only_ignored = np.where(label == 2, 2, 0).astype(np.uint8)
    pred = label == 1
    for ignore_label in (2, None):
        assert check(empty, label, ignore_label).surface_dice == 0.0
        check(pred, empty, ignore_label)
        got = check(empty, empty, ignore_label)
        assert got.score == pytest.approx(1.0) and got.surface_dice == 1.0
        check(pred, only_ignored, ignore_label)  # an empty label once the ignored voxels are cleared
        check(empty, only_ignored, ignore_label)
    check(np.ones(shape, np.uint8), label)  # a full prediction
    check(np.ones(shape, np.uint8), np.ones(shape, np.uint8))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 6, 5), (4, 1, 4), (3, 3, 1), (2, 9, 2), (5, 4, 3)])
def test_thin_volumes(shape):
    rng = np.random.default_rng(11)
    for _ in range(4):
        label = rng.integers(0, 3, shape).astype(np.uint8)
        check(rng.random(shape) < 0.5, label)
        check(rng.random(shape) < 0.5, label, None)


def test_no_state_leaks_between_trials():
    rng = np.random.default_rng(5)
    label = sheets_label((24, 28, 26), rng)
    prepared = PreparedLabel.from_label(label)
    first, second = list(noisy_predictions(label, rng))[:2]
    before = prepared.score(first)
    prepared.score(second)
    small = PreparedLabel.from_label(label[:9, :11, :10])  # other shapes share the work arrays
    small.score(first[:9, :11, :10])
    again = prepared.score(first)
    assert_same(again, before)
    assert_same(prepared.score(first), score_volume(first, label))


def test_pickles_and_scores_the_same():
    rng = np.random.default_rng(6)
    label = sheets_label((21, 25, 23), rng)
    prepared = PreparedLabel.from_label(label)
    copy = pickle.loads(pickle.dumps(prepared))
    for pred in list(noisy_predictions(label, rng))[:3]:
        assert_same(copy.score(pred), prepared.score(pred))
    assert copy.nbytes == prepared.nbytes


def test_timings_and_shape_errors():
    label = np.zeros((6, 7, 8), np.uint8)
    label[2:4] = 1
    prepared = PreparedLabel.from_label(label)
    timings: dict[str, float] = {}
    prepared.score(np.roll(label, 1, axis=0), timings=timings)
    assert {"surface_dice", "voi", "betti_numbers"} <= set(timings)
    with pytest.raises(ValueError, match="one shape"):
        prepared.score(np.zeros((6, 7, 9), np.uint8))
    with pytest.raises(ValueError, match="3D"):
        PreparedLabel.from_label(np.zeros((6, 7), np.uint8))


# --------------------------------------------------------------------------- the kernels, tile by tile


def random_tiles(count: int, seed: int):
    """Foreground pairs of one tile: independent noise, correlated noise, dense, smooth blobs."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = tuple(int(s) for s in rng.integers(1, 13, 3))
        kind = i % 4
        if kind == 0:
            fg_a, fg_b = rng.random(shape) < rng.uniform(0.2, 0.9), rng.random(shape) < rng.uniform(0.2, 0.9)
        elif kind == 1:
            fg_a = rng.random(shape) < 0.55
            fg_b = fg_a ^ (rng.random(shape) < 0.1)
        elif kind == 2:
            fg_a, fg_b = rng.random(shape) < 0.88, rng.random(shape) < 0.88
        else:
            field = ndimage.gaussian_filter(rng.random(shape), 1.0)
            fg_a = field > np.quantile(field, 0.45)
            fg_b = (field + 0.05 * rng.standard_normal(shape)) > np.quantile(field, 0.5)
        for flip in (None, 0, 1, 2):  # mirrored copies break ties differently
            if flip is None:
                yield np.ascontiguousarray(fg_a), np.ascontiguousarray(fg_b)
            else:
                yield np.ascontiguousarray(np.flip(fg_a, flip)), np.ascontiguousarray(np.flip(fg_b, flip))


@pytest.mark.parametrize("seed", [0, 1])
def test_dimension_kernels_equal_the_joint_ones(seed):
    scratch = Scratch()
    linked, nonzero = 0, 0
    for fg_a, fg_b in random_tiles(120, seed):
        a, b = fg_a.view(np.uint8), fg_b.view(np.uint8)
        assert matched_dim0_fast(a, b) == _matched_dim0(a, b)
        bg_a, bg_b = (~fg_a).view(np.uint8), (~fg_b).view(np.uint8)
        bg_c = bg_a & bg_b
        want = matched_dim1(bg_a, bg_b, bg_c)
        assert matched_dim1_fast(bg_a, bg_b, bg_c, scratch) == want
        (_, beta1, _), _ = _betti_numbers(b)
        chains = killing_chains(bg_b, beta1)
        if chains is not None:
            assert matched_dim1_linked(bg_a, bg_b, bg_c, *chains, scratch=scratch) == want
            linked += 1
        nonzero += want > 0
    assert linked > 300 and nonzero > 100


@pytest.mark.parametrize("name", sorted(TILE_CASES))
def test_dimension_kernels_on_the_library_tiles(name):
    arrays = conformance_arrays("betti_tile")
    bg_a = np.ascontiguousarray(arrays[f"{name}__a"], dtype=np.uint8)  # 1 = background
    bg_b = np.ascontiguousarray(arrays[f"{name}__b"], dtype=np.uint8)
    expected = TILE_CASES[name]
    fg_a, fg_b = (bg_a == 0).view(np.uint8), (bg_b == 0).view(np.uint8)
    if expected["dim0"]["a"] and expected["dim0"]["b"]:
        assert matched_dim0_fast(fg_a, fg_b) == expected["dim0"]["matched"]
    assert matched_dim1_fast(bg_a, bg_b, bg_a & bg_b) == expected["dim1"]["matched"]
    chains = killing_chains(bg_b, expected["dim1"]["b"])
    assert (chains is None) == (expected["dim1"]["b"] > MAX_LINK_BITS)
    if chains is not None:
        assert matched_dim1_linked(bg_a, bg_b, bg_a & bg_b, *chains) == expected["dim1"]["matched"]


def boundary_edges(squares: np.ndarray, shape) -> np.ndarray:
    """The edge ids (3*lin + axis) of the Z/2 boundary of a set of square ids."""
    n0, n1, n2 = shape
    strides = (n1 * n2, n2, 1)
    count: dict[int, int] = {}
    for square in squares.tolist():
        lin, t = divmod(square, 3)
        a, b = [axis for axis in range(3) if axis != t]
        for edge in (3 * lin + a, 3 * lin + b, 3 * (lin + strides[b]) + a, 3 * (lin + strides[a]) + b):
            count[edge] = count.get(edge, 0) ^ 1
    return np.array(sorted(e for e, odd in count.items() if odd), np.int64)


def test_label_chains_bound_a_basis_of_tunnels():
    """Each chain's boundary lies in the label's foreground complex, and there are beta_1 chains."""
    checked = 0
    for _, fg in random_tiles(40, 4):
        (_, beta1, _), _ = _betti_numbers(fg.view(np.uint8))
        bg = (~fg).view(np.uint8)
        chains = killing_chains(bg, beta1)
        if chains is None or beta1 == 0:
            continue
        squares, bits = chains
        assert np.all(np.diff(squares) < 0)
        flat = bg.ravel()
        strides = (fg.shape[1] * fg.shape[2], fg.shape[2], 1)
        for i in range(beta1):
            chain = squares[(bits >> np.uint64(i)) & np.uint64(1) == 1]
            assert chain.size
            for edge in boundary_edges(chain, fg.shape).tolist():
                lin, axis = divmod(edge, 3)
                assert not flat[lin] and not flat[lin + strides[axis]]  # a foreground edge
        assert not np.any(bits >> np.uint64(beta1))
        checked += 1
    assert checked > 20


def test_a_label_with_many_tunnels_per_tile_reduces_both_halves():
    rng = np.random.default_rng(9)
    label = (rng.random((24, 24, 24)) < 0.6).astype(np.uint8)
    prepared = PreparedLabel.from_label(label)
    assert any(t.chains is None and t.betti[1] > MAX_LINK_BITS for t in prepared.tiles)
    for pred in (label ^ (rng.random(label.shape) < 0.05), rng.random(label.shape) < 0.6):
        assert_same(prepared.score(pred), score_volume(pred, label))


def test_tiles_match_the_split():
    label = np.zeros((5, 1, 4), np.uint8)
    prepared = PreparedLabel.from_label(label)
    assert [t.tile for t in prepared.tiles] == [t for t in tile_slices(label.shape)
                                                 if all(s.stop > s.start for s in t)]


def test_warm_up_runs():
    from vesuvius_lab.core.metric.prepared import warm_up

    warm_up()
