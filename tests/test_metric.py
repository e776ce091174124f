"""The competition score: official values on the conformance cases, and each part against the
published implementation it must equal (surface_distance, scikit-image)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import conformance_arrays, conformance_expected

from vesuvius_lab.core.metric.score import (VolumeScore, dimension_f1, foreground_masks, mean_scores, score_volume,
                                            topo_score)
from vesuvius_lab.core.metric.surface_dice import surface_dice
from vesuvius_lab.core.metric.voi import voi_split_merge

CASES = conformance_expected("metric")


@pytest.fixture(scope="module")
def case_arrays():
    return conformance_arrays("metric")


@pytest.mark.parametrize("name", sorted(CASES))
def test_conformance_case(name, case_arrays):
    expected = CASES[name]
    got = score_volume(case_arrays[f"{name}__pred"], case_arrays[f"{name}__label"])
    for k in (0, 1, 2):
        counts = expected["betti_counts"][f"dim{k}"]
        assert got.betti[k] == (counts["matched"], counts["pred"], counts["label"]), f"dimension {k}"
    assert got.surface_dice == pytest.approx(expected["surface_dice"], abs=1e-6)
    assert got.voi_score == pytest.approx(expected["voi_score"], abs=1e-6)
    assert got.voi_split + got.voi_merge == pytest.approx(expected["voi_total"], abs=1e-6)
    assert got.topo_score == pytest.approx(expected["topo_score"], abs=1e-9)
    assert got.score == pytest.approx(expected["score"], abs=1e-3)


# --------------------------------------------------------------------------- the parts against their peers


def blob_pairs(count: int, seed: int):
    """Boolean pairs of smooth blobs and sheets, some touching the volume's faces, odd shapes."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = tuple(int(s) for s in rng.integers(6, 30, 3))
        field = ndimage.gaussian_filter(rng.random(shape), 1.5)
        label = field > np.quantile(field, rng.uniform(0.5, 0.9))
        noise = ndimage.gaussian_filter(rng.random(shape), 1.0)
        pred = (field + 0.3 * (noise - noise.mean())) > np.quantile(field, rng.uniform(0.5, 0.9))
        yield pred, label


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package's own scipy imports
def test_surface_dice_equals_surface_distance_package():
    import surface_distance

    for pred, label in blob_pairs(25, seed=0):
        if not (pred.any() and label.any()):
            continue
        distances = surface_distance.compute_surface_distances(label, pred, (1.0, 1.0, 1.0))
        expected = surface_distance.compute_surface_dice_at_tolerance(distances, 2.0)
        assert surface_dice(pred, label, 2.0) == pytest.approx(expected, abs=1e-9)
        # another tolerance exercises the ball of offsets
        assert surface_dice(pred, label, 1.0) == pytest.approx(
            surface_distance.compute_surface_dice_at_tolerance(distances, 1.0), abs=1e-9)


def test_surface_dice_of_empty_masks():
    empty, blob = np.zeros((5, 6, 7), bool), np.zeros((5, 6, 7), bool)
    blob[2, 3, 3] = True
    assert surface_dice(empty, empty) == 1.0
    assert surface_dice(blob, empty) == 0.0 and surface_dice(empty, blob) == 0.0
    assert surface_dice(blob, blob) == 1.0


def test_voi_equals_scikit_image_on_the_covered_voxels():
    import cc3d
    from skimage.metrics import variation_of_information

    for pred, label in blob_pairs(25, seed=1):
        label_ids = cc3d.connected_components(label, connectivity=26)
        pred_ids = cc3d.connected_components(pred, connectivity=26)
        covered = (label_ids > 0) | (pred_ids > 0)
        if not covered.any():
            continue
        split, merge = variation_of_information(label_ids[covered], pred_ids[covered])
        assert voi_split_merge(pred, label) == pytest.approx((split, merge), abs=1e-9)


def test_voi_split_and_merge_have_the_right_sides():
    label = np.zeros((3, 3, 9), bool)
    label[1, 1, 1:8] = True  # one label component
    pred = label.copy()
    pred[1, 1, 4] = False  # the prediction splits it in two
    split, merge = voi_split_merge(pred, label)
    assert split > 0 and merge == 0
    assert voi_split_merge(label, pred) == pytest.approx((merge, split))
    assert voi_split_merge(np.zeros_like(label), np.zeros_like(label)) == (0.0, 0.0)


# --------------------------------------------------------------------------- the score's own rules


def test_dimension_f1_rules():
    assert dimension_f1(0, 0, 0) is None  # skipped
    assert dimension_f1(3, 4, 5) == pytest.approx(6 / 9)
    assert dimension_f1(0, 3, 0) == pytest.approx(0.5 / 3.5)  # spurious features only
    assert dimension_f1(0, 0, 4) == 0.0  # features missed


def test_topo_score_renormalises_the_active_dimensions():
    assert topo_score({0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0)}) == 1.0
    assert topo_score({0: (2, 2, 2), 1: (0, 0, 0), 2: (0, 0, 0)}) == pytest.approx(1.0)
    mixed = {0: (1, 2, 2), 1: (0, 0, 3), 2: (0, 0, 0)}
    assert topo_score(mixed) == pytest.approx((0.34 * 0.5 + 0.33 * 0.0) / 0.67)


def test_ignored_voxels_do_not_count_and_any_nonzero_prediction_is_surface():
    rng = np.random.default_rng(2)
    label = (rng.random((20, 20, 20)) < 0.3).astype(np.uint8)
    label[:, :, :6] = 2
    pred = np.where(label == 1, 2, 0).astype(np.uint8)  # a predicted 2 is surface
    assert score_volume(pred, label).score == pytest.approx(1.0)
    scribbled = pred.copy()
    scribbled[label == 2] = rng.integers(0, 3, int((label == 2).sum()))  # changes inside the ignored slab
    assert score_volume(scribbled, label) == score_volume(pred, label)
    pred_fg, label_fg = foreground_masks(scribbled, label)
    assert not pred_fg[label == 2].any() and not label_fg[label == 2].any()
    # without the ignore label, the same prediction is judged on every voxel
    assert score_volume(scribbled, label, ignore_label=None).score < 1.0


def test_score_is_the_weighted_sum():
    rng = np.random.default_rng(4)
    label = (rng.random((16, 18, 20)) < 0.2).astype(np.uint8)
    pred = ((label == 1) ^ (rng.random(label.shape) < 0.05)).astype(np.uint8)
    s = score_volume(pred, label)
    assert s.score == pytest.approx(0.30 * s.topo_score + 0.35 * s.surface_dice + 0.35 * s.voi_score)
    assert s.voi_score == pytest.approx(1 / (1 + 0.3 * (s.voi_split + s.voi_merge)))
    assert 0.0 < s.score < 1.0


def test_score_volume_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        score_volume(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8))


def test_to_dict_and_mean_scores():
    a = VolumeScore(0.5, 0.4, 0.6, 0.7, 1.0, 0.5, {0: (1, 2, 3), 1: (0, 0, 0), 2: (0, 1, 0)})
    b = VolumeScore(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, {0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0)})
    data = json.loads(json.dumps(a.to_dict()))
    assert data["betti"] == {"0": [1, 2, 3], "1": [0, 0, 0], "2": [0, 1, 0]}
    assert {k: data[k] for k in ("score", "topo_score", "surface_dice", "voi_score", "voi_split", "voi_merge")} == \
        {"score": 0.5, "topo_score": 0.4, "surface_dice": 0.6, "voi_score": 0.7, "voi_split": 1.0, "voi_merge": 0.5}
    mean = mean_scores([a, b])
    assert mean["n_volumes"] == 2 and mean["score"] == pytest.approx(0.75) and mean["voi_split"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_scores([])
