"""Merging a stitcher's voxels into the mask it repairs: the topology rule keeps exactly the groups
that close a tunnel in one sheet, and the score shows it."""

from __future__ import annotations

import numpy as np
import pytest

from vesuvius_lab.core.inference.stitch_merge import close_tunnels, merge_stitched
from vesuvius_lab.core.metric.score import score_volume


def plate(shape=(7, 21, 21), z=3) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[z, 1:-1, 1:-1] = 1
    return mask


def disk(shape, z, radius, centre=(10, 10)) -> np.ndarray:
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    out = np.zeros(shape, bool)
    out[z] = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    return out


def test_the_voxels_of_a_hole_are_kept_and_the_sheet_is_whole_again():
    intact = plate()
    hole = disk(intact.shape, 3, 4)
    damaged = intact * ~hole
    merged = merge_stitched(damaged, intact, "topology")
    np.testing.assert_array_equal(merged, intact)
    assert score_volume(merged, intact).score > score_volume(damaged, intact).score


def test_dust_a_bridge_between_sheets_and_thickening_are_refused():
    two = plate() | plate(z=5)
    proposed = np.zeros_like(two, dtype=bool)
    proposed[0, 10, 10] = True                      # dust, touching no sheet
    proposed[4, 12, 12] = True                      # a bridge joining the two sheets
    thick = np.zeros_like(proposed)
    thick[6, 2:19, 2:19] = True                     # a layer on the upper sheet: closes no tunnel
    np.testing.assert_array_equal(close_tunnels(two, proposed | thick), two)


def test_a_half_filled_hole_is_refused_because_it_opens_more_tunnels_than_it_closes():
    damaged = plate() * ~disk((7, 21, 21), 3, 4)
    plug = disk((7, 21, 21), 3, 1)
    bridges = np.zeros_like(plug)
    bridges[3, 10, 2:19] = True                     # joins the plug to the rim on two sides: two gaps remain
    proposed = (plug | bridges) & (damaged == 0)
    np.testing.assert_array_equal(close_tunnels(damaged, proposed), damaged)


def test_a_lid_that_would_enclose_a_small_cavity_is_refused():
    # Cavities are counted near the group only (see close_tunnels): this one lies within two voxels.
    cup = np.zeros((9, 9, 9), np.uint8)
    cup[5:8, 1:8, 1:8] = 1
    cup[6:8, 2:7, 2:7] = 0                          # a shallow tray open at the top (z = 7)
    lid = np.zeros_like(cup, dtype=bool)
    lid[7, 2:7, 2:7] = True
    np.testing.assert_array_equal(close_tunnels(cup, lid), cup)


def test_two_holes_in_one_sheet_are_closed_independently():
    intact = plate()
    holes = disk(intact.shape, 3, 2, (5, 5)) | disk(intact.shape, 3, 2, (15, 15))
    damaged = intact * ~holes
    merged = close_tunnels(damaged, holes)
    np.testing.assert_array_equal(merged, intact)


def test_other_rules_and_bad_rule():
    mask = np.zeros((9, 9, 21), np.uint8)
    mask[4, 4, :5] = 1
    stitched = np.zeros_like(mask)
    stitched[4, 4, :] = 1                           # reaches 16 voxels beyond the input
    assert merge_stitched(mask, stitched, "union").sum() == 21
    near = merge_stitched(mask, stitched, "near", 3)
    assert near.sum() == 8 and near[4, 4, :8].all()  # only within 3 steps of the input
    np.testing.assert_array_equal(merge_stitched(mask, np.zeros_like(mask), "replace"), 0)
    with pytest.raises(ValueError, match="topology"):
        merge_stitched(mask, stitched, "nearest")
