"""The topology post-processing steps (vesuvius_lab/plugins/topology.py) on small synthetic volumes
with known answers: tunnels plugged, gaps patched, sheets never bridged, plates over blobs."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from vesuvius_lab.core import registry
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.metric.betti import betti_counts
from vesuvius_lab.core.metric.score import score_volume


def step(name: str, threshold: float = 0.5, **params):
    return registry.build("postprocessors", name, params, device="cpu", runs_dir=None, threshold=threshold)


def tunnels(mask: np.ndarray) -> int:
    """Betti-1 of the mask as the metric counts it (foreground 6-, background 26-connected)."""
    inverted = (mask == 0).astype(np.uint8)  # betti_counts takes 0 = foreground
    return betti_counts(inverted, inverted)[1][1]


def components(mask: np.ndarray) -> int:
    return cc3d.connected_components(mask != 0, connectivity=26, return_N=True)[1]


def disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def parallel_sheets(depths=(10, 14), shape=(24, 32, 32)) -> np.ndarray:
    """Flat one-voxel sheets at the given depths (3 empty layers between 10 and 14)."""
    mask = np.zeros(shape, np.uint8)
    mask[list(depths)] = 1
    return mask


# --------------------------------------------------------------------------- plug_holes


def test_plug_holes_plugs_a_one_voxel_tunnel():
    sheet = np.zeros((20, 20, 20), np.uint8)
    sheet[10] = 1
    sheet[10, 10, 10] = 0                          # a one-voxel hole: one tunnel through the sheet
    assert tunnels(sheet) == 1

    plugged = step("plug_holes")(sheet)
    assert tunnels(plugged) == 0
    assert plugged[10, 10, 10] == 1 and plugged.sum() == sheet.sum() + 1


def test_plug_holes_bridges_no_gap_between_sheets():
    two = parallel_sheets((8, 10), (20, 20, 20))   # one empty layer between the sheets
    two[8, 5, 5] = two[10, 12, 12] = 0             # a hole in each
    slit = np.zeros((20, 20, 20), np.uint8)
    slit[10, :, :9] = slit[10, :, 10:] = 1         # two half-sheets of one plane, a one-voxel slit apart

    plugged = step("plug_holes", iterations=3)(two)
    assert tunnels(two) == 2 and tunnels(plugged) == 0
    assert plugged[9].sum() == 0 and components(plugged) == 2
    np.testing.assert_array_equal(step("plug_holes")(slit), slit)


# --------------------------------------------------------------------------- patch_sheets


def test_patch_sheets_restores_a_gap_in_a_curved_sheet():
    z, y, x = np.mgrid[:48, :48, :48]
    height = 12 + 0.015 * ((y - 24) ** 2 + (x - 24) ** 2)  # a paraboloid, slopes up to 0.7
    full = (np.abs(z - height) <= 1.5).astype(np.uint8)     # thick enough to have no tunnel
    holed = full * ~disc((48, 48), (30, 18), 4)[None]      # a missing disc of radius 4
    missing = (full != 0) & (holed == 0)

    patched = step("patch_sheets", min_voxels=100, max_gap_area=200)(holed)
    added = (patched != 0) & (holed == 0)
    assert (added & missing).sum() >= 0.8 * missing.sum()
    assert (added & (full == 0)).sum() <= 0.2 * missing.sum()
    assert tunnels(full) == 0 and tunnels(holed) == 1 and tunnels(patched) == 0
    assert score_volume(patched, full).score > score_volume(holed, full).score + 0.005


def test_patch_sheets_never_bridges_parallel_sheets():
    two = parallel_sheets()
    two[10][disc((32, 32), (16, 16), 4)] = 0

    patched = step("patch_sheets", min_voxels=100, clearance=2)(two)
    assert patched[10].all()                                 # the hole is patched ...
    assert patched[11:14].sum() == 0 and components(patched) == 2  # ... and nothing joins the sheets
    # The other sheet lies 4 voxels from the patch: within a clearance of 4 the patch is refused.
    np.testing.assert_array_equal(step("patch_sheets", min_voxels=100, clearance=4)(two), two)
    # Components below min_voxels are left alone.
    np.testing.assert_array_equal(step("patch_sheets", min_voxels=2000)(two), two)


# --------------------------------------------------------------------------- close


def test_close_per_component_never_bridges_two_sheets():
    two = parallel_sheets((5, 9), (20, 20, 20))    # 3 empty layers between
    two[5, 10, 10:12] = 0                          # a small hole in one sheet
    assert components(step("close", radius_depth=2, radius_plane=1)(two)) == 1  # plain closing bridges

    closed = step("close", radius_depth=2, radius_plane=1, per_component=True)(two)
    assert components(closed) == 2 and closed[6:9].sum() == 0
    np.testing.assert_array_equal(closed, parallel_sheets((5, 9), (20, 20, 20)))  # the hole is closed


def test_close_along_depth_only():
    along_depth = np.zeros((24, 24, 24), np.uint8)
    along_depth[4:10, 12, 12] = along_depth[13:20, 12, 12] = 1  # a gap of 3 voxels along depth
    in_plane = np.zeros((24, 24, 24), np.uint8)
    in_plane[12, 12, 4:10] = in_plane[12, 12, 13:20] = 1        # the same gap along width
    close = step("close", radius_depth=2, radius_plane=0)

    assert close(along_depth)[4:20, 12, 12].all() and close(along_depth).sum() == 16
    np.testing.assert_array_equal(close(in_plane), in_plane)
    # Both radii 0: nothing to close (a tuner's way to switch the step off).
    np.testing.assert_array_equal(step("close", radius_depth=0, radius_plane=0, per_component=True)(in_plane), in_plane)
    # Probabilities are thresholded first, at the chain's threshold.
    prob = along_depth * np.float32(0.6)
    assert close(prob).sum() == 16 and step("close", threshold=0.7, radius_depth=2, radius_plane=0)(prob).sum() == 0


# --------------------------------------------------------------------------- sheetness, smooth, clear_border


@pytest.mark.parametrize("params", [{"mode": "replace", "sigmas": [1.0]}, {"sigmas": [1.0, 2.0]}])
def test_sheetness_raises_plates_over_blobs(params):
    z, y, x = np.mgrid[:40, :40, :40]
    plate = (z >= 10) & (z <= 11) & (y >= 5) & (y < 35) & (x >= 5) & (x < 35)
    ball = (z - 28) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 25
    prob = np.where(plate | ball, 0.6, 0.0).astype(np.float32)

    out = step("sheetness", **params)(prob)
    assert out[plate].mean() > out[ball].mean() + 0.1


def test_smooth_is_a_gaussian_of_the_probabilities():
    rng = np.random.default_rng(0)
    prob = rng.random((12, 14, 16), dtype=np.float32)
    np.testing.assert_allclose(step("smooth", sigma=1.5)(prob),
                               ndimage.gaussian_filter(prob, 1.5, mode="nearest"), atol=1e-6)
    # Per axis: smoothing along depth and height leaves a volume that varies only along width.
    ramp = np.broadcast_to(np.linspace(0, 1, 16, dtype=np.float32), (12, 14, 16)).copy()
    np.testing.assert_allclose(step("smooth", sigma=[2.0, 2.0, 0.01])(ramp), ramp, atol=1e-6)
    # A mask counts as 0/1 probabilities.
    point = np.zeros((9, 9, 9), np.uint8)
    point[4, 4, 4] = 1
    assert step("smooth", sigma=1.0)(point).sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_clear_border_zeroes_the_faces_and_keeps_the_dtype(dtype):
    volume = np.ones((10, 12, 14), dtype)
    out = step("clear_border", width=2)(volume)
    assert out.dtype == dtype and out.sum() == 6 * 8 * 10 and out[2:-2, 2:-2, 2:-2].all()
    assert volume.all()  # the input is left alone


# --------------------------------------------------------------------------- every step


STEPS = [("close", {"radius_depth": 1, "radius_plane": 2, "per_component": True}), ("plug_holes", {}),
         ("patch_sheets", {"min_voxels": 10}), ("sheetness", {}), ("smooth", {"sigma": 1.0}),
         ("clear_border", {"width": 1})]


@pytest.mark.parametrize("name, params", STEPS)
@pytest.mark.parametrize("kind", ["probabilities", "mask"])
def test_every_step_keeps_the_shape_and_returns_the_right_dtype(name, params, kind):
    prob = np.random.default_rng(1).random((10, 12, 14), dtype=np.float32)
    volume = prob if kind == "probabilities" else (prob > 0.5).astype(np.uint8)
    out = step(name, **params)(volume)
    assert out.shape == volume.shape
    if name in ("sheetness", "smooth"):
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    elif name == "clear_border":
        assert out.dtype == volume.dtype
    else:
        assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}


@pytest.mark.parametrize("name, params", [
    ("close", {"radius_depth": -1}), ("close", {"radius_plane": 17}), ("close", {"radius": 2}),
    ("plug_holes", {"iterations": 0}), ("patch_sheets", {"clearance": -1}), ("patch_sheets", {"max_gap_area": 0}),
    ("patch_sheets", {"thickness": 0}), ("sheetness", {"sigmas": []}), ("sheetness", {"sigmas": [-1.0]}),
    ("sheetness", {"mode": "replace", "weight": 0.3}), ("sheetness", {"weight": 1.5}), ("smooth", {"sigma": 0}),
    ("smooth", {"sigma": [1.0, 2.0]}), ("clear_border", {"width": 0}),
])
def test_bad_params_are_user_errors(name, params):
    with pytest.raises(UserError, match="Invalid params"):
        step(name, **params)
