"""Post-processing plugins, the chain and ``vlab postprocess`` on tiny volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from pydantic import ValidationError

from vesuvius_lab.core import registry
from vesuvius_lab.core.inference.postprocess import Chain, build_chain, read_prediction, step_labels


def step(name: str, threshold: float = 0.5, **params):
    return registry.build("postprocessors", name, params, device="cpu", runs_dir=None, threshold=threshold)


def sheet_with_hole(shape=(24, 24, 24), z=12, centre=(12, 12), radius=2) -> tuple[np.ndarray, np.ndarray]:
    """A one-voxel-thick plane at depth z, and the same plane with a disk-shaped hole punched in it."""
    plane = np.zeros(shape, np.uint8)
    plane[z] = 1
    holed = plane.copy()
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    holed[z][(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2] = 0
    return plane, holed


# --------------------------------------------------------------------------- remove_small_components


@pytest.mark.parametrize("connectivity, kept_pairs", [(6, set()), (18, {"edge"}), (26, {"edge", "corner"})])
def test_dust_removed_by_connectivity(connectivity, kept_pairs):
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2, 2:18, 2:18] = 1                       # a big sheet: always kept
    mask[10, 10, 10] = 1                          # a lone voxel: always removed
    mask[15, 5, 5] = mask[16, 6, 5] = 1           # two voxels sharing an edge (18- and 26-connected)
    mask[15, 12, 12] = mask[16, 13, 13] = 1       # two voxels sharing a corner (26-connected only)
    out = step("remove_small_components", min_voxels=2, connectivity=connectivity)(mask)

    assert out.dtype == np.uint8
    assert out[2].sum() == 16 * 16
    assert out[10, 10, 10] == 0
    assert bool(out[15, 5, 5] and out[16, 6, 5]) == ("edge" in kept_pairs)
    assert bool(out[15, 12, 12] and out[16, 13, 13]) == ("corner" in kept_pairs)


def test_remove_small_components_thresholds_probabilities_first():
    prob = np.zeros((12, 12, 12), np.float32)
    prob[2, 1:11, 1:11] = 0.9                     # 100 voxels above 0.5
    prob[8, 1:11, 1:11] = 0.4                     # a big sheet below the threshold: not surface at all
    prob[6, 6, 6] = 0.95                          # dust
    out = step("remove_small_components", min_voxels=5)(prob)
    assert out.dtype == np.uint8 and out.sum() == 100 and out[2].sum() == 100


# --------------------------------------------------------------------------- holes


@pytest.mark.parametrize("normal_axis", [0, 1, 2])
def test_closing_closes_a_punched_hole_in_a_sheet(normal_axis):
    plane, holed = (np.moveaxis(m, 0, normal_axis) for m in sheet_with_hole(radius=2))
    assert step("fill_holes", mode="3d")(holed).sum() == holed.sum()  # a hole in a sheet is not enclosed in 3D
    np.testing.assert_array_equal(step("fill_holes", mode="closing", radius=3)(holed), plane)
    # Too small a disk, or a ball of any size, leaves a thin sheet's hole open.
    assert step("fill_holes", mode="closing", radius=2)(holed).sum() < plane.sum()
    np.testing.assert_array_equal(step("fill_holes", mode="closing", radius=5, element="ball")(holed), holed)


def test_fill_holes_3d_fills_an_enclosed_cavity_up_to_a_size():
    grid = np.sum((np.mgrid[:21, :21, :21] - 10) ** 2, axis=0)
    big = ((grid <= 64) & (grid > 36)).astype(np.uint8)        # a shell of radius 8 enclosing ~900 voxels
    small = np.zeros_like(big)
    small[1:4, 1:4, 1:4] = 1
    small[2, 2, 2] = 0                                          # a 1-voxel cavity
    mask = big | small

    filled = step("fill_holes", mode="3d")(mask)
    assert filled[10, 10, 10] == 1 and filled[2, 2, 2] == 1
    assert filled.sum() == (grid <= 64).sum() + 27

    only_small = step("fill_holes", mode="3d", max_hole_voxels=10)(mask)
    assert only_small[2, 2, 2] == 1 and only_small[10, 10, 10] == 0


def test_fill_holes_slices_fills_rings_along_the_chosen_axis():
    yy, xx = np.mgrid[:16, :16]
    ring = ((yy - 8) ** 2 + (xx - 8) ** 2 <= 25) & ((yy - 8) ** 2 + (xx - 8) ** 2 >= 9)
    tube = np.broadcast_to(ring, (10, 16, 16)).astype(np.uint8)  # open at both ends: no 3D cavity
    assert step("fill_holes", mode="3d")(tube).sum() == tube.sum()
    along0 = step("fill_holes", mode="slices", axis=0)(tube)
    assert along0[:, 8, 8].all() and along0.sum() == 10 * ((yy - 8) ** 2 + (xx - 8) ** 2 <= 25).sum()
    # The size limit counts a hole's voxels within its slice (25 per ring here).
    assert step("fill_holes", mode="slices", max_hole_voxels=25)(tube).sum() == along0.sum()
    assert step("fill_holes", mode="slices", max_hole_voxels=24)(tube).sum() == tube.sum()
    # Across the tube (slices along axis 2) no hole is enclosed.
    assert step("fill_holes", mode="slices", axis=2)(tube).sum() == tube.sum()


# --------------------------------------------------------------------------- threshold


def test_hysteresis_keeps_weak_voxels_connected_to_strong_ones():
    prob = np.zeros((16, 16, 16), np.float32)
    prob[4, 2:14, 2:14] = 0.35                    # weak sheet ...
    prob[4, 8, 8] = 0.9                           # ... with one strong voxel
    prob[11, 2:14, 2:14] = 0.35                   # weak sheet, no strong voxel
    out = step("threshold", low=0.3, high=0.8)(prob)
    assert out[4].sum() == 144 and out[11].sum() == 0
    plain = step("threshold")(prob)               # the experiment's threshold, 0.5
    assert plain.sum() == 1
    assert step("threshold", value=0.3)(prob).sum() == 288


def test_threshold_params_are_checked():
    for bad in ({"low": 0.3}, {"low": 0.6, "high": 0.4}, {"value": 0.5, "low": 0.2, "high": 0.7}, {"typo": 1}):
        with pytest.raises(ValidationError):
            registry.validate_params("postprocessors", "threshold", bad)


def test_a_mask_passes_threshold_unchanged():
    mask = (np.random.default_rng(0).random((8, 8, 8)) > 0.7).astype(np.uint8)
    np.testing.assert_array_equal(step("threshold", low=0.2, high=0.9)(mask), mask)


# --------------------------------------------------------------------------- morphology and median


def test_dilate_and_erode_by_ball_and_iterations():
    point = np.zeros((11, 11, 11), np.uint8)
    point[5, 5, 5] = 1
    assert step("dilate")(point).sum() == 7                   # the 6-connected cross
    assert step("dilate", iterations=2)(point).sum() == 25    # an octahedron of radius 2
    assert step("dilate", radius=2)(point).sum() == 33        # the ball of radius 2

    cube = np.zeros((11, 11, 11), np.uint8)
    cube[3:8, 3:8, 3:8] = 1
    assert step("erode")(cube).sum() == 27
    # A sheet crossing the volume's faces keeps its full extent: outside counts as surface.
    slab = np.zeros((9, 9, 9), np.uint8)
    slab[3:6] = 1
    eroded = step("erode")(slab)
    assert eroded[4].all() and eroded.sum() == 81


def test_median_is_a_majority_vote_on_masks_and_a_median_on_probabilities():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[3:9, 3:9, 3:9] = 1
    noisy = mask.copy()
    noisy[0, 0, 0] = noisy[10, 10, 10] = 1        # isolated specks
    noisy[5, 5, 5] = 0                            # a pinhole
    smoothed = step("median")(noisy)
    assert smoothed.dtype == np.uint8
    assert smoothed[0, 0, 0] == smoothed[10, 10, 10] == 0 and smoothed[5, 5, 5] == 1

    prob = rng.random((10, 10, 10), dtype=np.float32)
    out = step("median", iterations=2)(prob)
    assert out.dtype == np.float32
    expected = ndimage.median_filter(ndimage.median_filter(prob, size=3, mode="nearest"), size=3, mode="nearest")
    np.testing.assert_array_equal(out, expected)
    # The median commutes with the threshold: on a mask it agrees with the float median.
    np.testing.assert_array_equal(step("median")(prob > 0.5), (ndimage.median_filter(prob, 3, mode="nearest") > 0.5))


# --------------------------------------------------------------------------- the chain


def test_step_labels_are_unique():
    assert step_labels(["remove_small_components", "fill_holes", "fill_holes", "threshold"]) == [
        "remove_small_components", "fill_holes", "fill_holes#2", "threshold#2"]


def test_chain_runs_steps_in_order_and_reports_each_step():
    mask = np.zeros((16, 16, 16), np.float32)
    mask[4:12, 4:12, 4:12] = 0.9
    mask[1, 1, 1] = 0.9                           # a speck: erode then dilate removes it, the reverse keeps it
    open_ = build_chain([{"plugin": "erode"}, {"plugin": "dilate"}], threshold=0.5)
    close = build_chain([{"plugin": "dilate"}, {"plugin": "erode"}], threshold=0.5)
    assert open_.apply(mask)[1, 1, 1] == 0
    assert close.apply(mask)[1, 1, 1] == 1

    chain = build_chain([{"plugin": "remove_small_components", "params": {"min_voxels": 3}},
                         {"plugin": "fill_holes", "params": {"mode": "3d"}},
                         {"plugin": "fill_holes", "params": {"mode": "closing", "radius": 1}}], threshold=0.5)
    assert isinstance(chain, Chain)
    steps = chain.apply_steps(mask)
    assert [label for label, _ in steps] == chain.labels == [
        "threshold", "remove_small_components", "fill_holes", "fill_holes#2"]
    assert all(m.dtype == np.uint8 and m.shape == mask.shape for _, m in steps)
    np.testing.assert_array_equal(steps[0][1], mask > 0.5)
    assert steps[0][1][1, 1, 1] == 1 and steps[1][1][1, 1, 1] == 0
    np.testing.assert_array_equal(chain.apply(mask), steps[-1][1])


def test_chain_thresholds_probabilities_left_at_the_end():
    prob = np.random.default_rng(1).random((10, 10, 10), dtype=np.float32)
    chain = build_chain([{"plugin": "median"}], threshold=0.6)
    out = chain.apply(prob)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    from scipy import ndimage
    np.testing.assert_array_equal(out, ndimage.median_filter(prob, 3, mode="nearest") > 0.6)
    assert build_chain([], threshold=0.6).apply_steps(prob)[0][0] == "threshold"


def test_unknown_step_is_a_user_error():
    from vesuvius_lab.core.errors import UserError

    with pytest.raises(UserError, match="remove_small_components"):
        build_chain([{"plugin": "remove_small_component", "params": {"min_voxels": 3}}], threshold=0.5)


def scroll_like(shape=(48, 48, 48)) -> np.ndarray:
    """A label of three wavy sheets, 3 voxels thick, with the ignore label on two faces."""
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(np.float32)
    surface = z + 2 * np.sin(x / 9) + 1.5 * np.cos(y / 11)
    label = (np.abs(surface % 16 - 8) < 1.5).astype(np.uint8)
    label[:, :2] = 2
    label[:, -2:] = 2
    return label


def test_chain_raises_the_competition_score_of_a_prediction_with_dust_and_holes():
    from vesuvius_lab.core.metric.score import score_volume

    label = scroll_like()
    rng = np.random.default_rng(3)
    prob = np.where(label == 1, 0.9, 0.1).astype(np.float32)
    for _ in range(25):                           # holes in the sheets
        c = np.argwhere(label == 1)[rng.integers((label == 1).sum())]
        prob[c[0] - 1:c[0] + 2, c[1] - 2:c[1] + 3, c[2] - 2:c[2] + 3] = 0.1
    for _ in range(60):                           # dust between the sheets
        c = rng.integers(2, 46, size=3)
        prob[c[0]:c[0] + 2, c[1]:c[1] + 2, c[2]:c[2] + 2] = 0.8

    chain = build_chain([{"plugin": "remove_small_components", "params": {"min_voxels": 50}},
                         {"plugin": "fill_holes", "params": {"mode": "closing", "radius": 3}}], threshold=0.5)
    scores = {label_: score_volume(mask, label).score for label_, mask in chain.apply_steps(prob)}
    assert scores["remove_small_components"] > scores["threshold"]
    assert scores["fill_holes"] > scores["remove_small_components"]


# --------------------------------------------------------------------------- files and the command


EXPERIMENT = """
name = "pp"
[model]
plugin = "monai_unet"
[inference]
threshold = 0.5
[[postprocess]]
plugin = "remove_small_components"
params = { min_voxels = 4 }
"""


def test_read_prediction_rule(tmp_path):
    from vesuvius_lab.core.errors import UserError

    prob = np.full((4, 5, 6), 0.25, np.float16)
    tifffile.imwrite(tmp_path / "p.tif", prob, photometric="minisblack")
    assert read_prediction(tmp_path / "p.tif").dtype == np.float32
    tifffile.imwrite(tmp_path / "bad.tif", prob * 8, photometric="minisblack")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        read_prediction(tmp_path / "bad.tif")
    tifffile.imwrite(tmp_path / "u8.tif", np.full((4, 5, 6), 200, np.uint8), photometric="minisblack")
    with pytest.raises(UserError, match="--uint8-probabilities"):
        read_prediction(tmp_path / "u8.tif")
    np.testing.assert_allclose(read_prediction(tmp_path / "u8.tif", uint8_probabilities=True), 200 / 255)


def test_vlab_postprocess_writes_masks(tmp_path, monkeypatch):
    from vesuvius_lab.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pp.toml").write_text(EXPERIMENT)
    inputs = tmp_path / "pred"
    inputs.mkdir()
    prob = np.zeros((10, 12, 12), np.float16)
    prob[5, 2:10, 2:10] = 0.8
    prob[1, 1, 1] = 0.99                           # dust
    tifffile.imwrite(inputs / "a.tif", prob, photometric="minisblack")
    mask = (prob > 0.5).astype(np.uint8)
    mask[8, 8, 8] = 1
    tifffile.imwrite(inputs / "b.tif", mask, photometric="minisblack")

    main(["postprocess", "pp.toml", "--input", "pred", "--output", "masks"])
    for name in ("a.tif", "b.tif"):
        out = tifffile.imread(tmp_path / "masks" / name)
        assert out.dtype == np.uint8 and out.shape == (10, 12, 12)
        assert out.sum() == 64 and out[5, 2:10, 2:10].all()
    assert not [p for p in (tmp_path / "masks").iterdir() if p.name.startswith(".")]  # no temporary left

    tifffile.imwrite(inputs / "c.tif", (prob * 255).astype(np.uint8), photometric="minisblack")
    with pytest.raises(SystemExit) as exit_:
        main(["postprocess", "pp.toml", "--input", "pred", "--output", "masks"])
    assert exit_.value.code == 2
    main(["postprocess", "pp.toml", "--input", "pred", "--output", "masks2", "--uint8-probabilities",
          "--set", "postprocess.0.params.min_voxels=100"])
    assert tifffile.imread(tmp_path / "masks2" / "c.tif").sum() == 0  # the 64-voxel sheet is now dust too
