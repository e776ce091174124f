"""The global pass's chunked steps give the in-memory chain's result, whatever the chunks."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from vesuvius_lab.core import registry
from vesuvius_lab.core.inference.blocks import Box
from vesuvius_lab.core.inference.global_pass import pass_chunks, split_chain
from vesuvius_lab.core.inference.postprocess import build_chain

THRESHOLD = 0.5


def sheets(shape, seed: int) -> np.ndarray:
    """float32 probabilities: smoothed noise, so that components of every size cross chunk faces, with
    enclosed cavities and dust."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 1.5)
    field = (field - field.min()) / (field.max() - field.min())
    return field.astype(np.float32)


GLOBAL_STEPS = [
    {"plugin": "threshold", "params": {"low": 0.45, "high": 0.6}},
    {"plugin": "threshold", "params": {"low": 0.4, "high": 0.7, "connectivity": 6}},
    {"plugin": "remove_small_components", "params": {"min_voxels": 20}},
    {"plugin": "remove_small_components", "params": {"min_voxels": 3, "connectivity": 6}},
    {"plugin": "fill_holes", "params": {"mode": "3d"}},
    {"plugin": "fill_holes", "params": {"mode": "3d", "max_hole_voxels": 4}},
    {"plugin": "fill_holes", "params": {"mode": "slices", "axis": 1, "max_hole_voxels": 6}},
    {"plugin": "clear_border", "params": {"width": 3}},
]


def chunked_result(steps, volume: np.ndarray, chunks) -> np.ndarray:
    """The chain's steps applied as the global pass applies them, on a dask array of ``chunks``."""
    from vesuvius_lab.core.inference.chunked import to_mask
    from vesuvius_lab.core.inference.global_pass import chunked_steps

    chain = build_chain(steps, threshold=THRESHOLD)
    array = da.from_array(volume, chunks=chunks)
    for form in chunked_steps(chain.steps, threshold=THRESHOLD, voxels=volume.size):
        array = form.apply(array)
    with dask.config.set(scheduler="synchronous"):
        return to_mask(array, THRESHOLD).compute()


@pytest.mark.parametrize("step", GLOBAL_STEPS, ids=lambda s: f"{s['plugin']}-{'-'.join(map(str, s['params'].values()))}")
@pytest.mark.parametrize("chunks", [(12, 15, 16), (16, 10, 31)])  # few chunks: the labelling graph grows fast
def test_each_global_step_chunked_equals_the_whole_volume(step, chunks):
    volume = sheets((23, 29, 31), seed=len(str(step)))
    chain = build_chain([step], threshold=THRESHOLD)
    assert registry.load("postprocessors", step["plugin"]).global_pass is not None
    expected = chain.apply(volume)
    assert 0 < expected.sum() < expected.size  # something to keep and something to drop
    np.testing.assert_array_equal(chunked_result([step], volume, chunks), expected)


def test_a_chain_of_local_and_global_steps_chunked_equals_the_whole_volume():
    steps = [{"plugin": "median"}, {"plugin": "threshold", "params": {"low": 0.42, "high": 0.6}},
             {"plugin": "dilate", "params": {"radius": 1}}, {"plugin": "remove_small_components", "params": {"min_voxels": 30}},
             {"plugin": "fill_holes", "params": {"mode": "3d"}}, {"plugin": "erode", "params": {"radius": 1}}]
    volume = sheets((26, 21, 30), seed=3)
    chain = build_chain(steps, threshold=THRESHOLD)
    local, rest = split_chain(chain)
    assert [s.ref.plugin for s in local] == ["median"] and rest[0].ref.plugin == "threshold"
    from vesuvius_lab.core.inference.global_pass import apply_local

    staged = apply_local(local, volume)
    expected = chain.apply(volume)
    rest_refs = [s.ref for s in rest]
    np.testing.assert_array_equal(chunked_result(rest_refs, staged, (13, 11, 15)), expected)


def test_a_global_step_without_a_chunked_form_runs_on_the_whole_array():
    steps = [{"plugin": "plug_holes"}]
    volume = sheets((20, 20, 20), seed=5)
    expected = build_chain(steps, threshold=THRESHOLD).apply(volume)
    np.testing.assert_array_equal(chunked_result(steps, volume, (10, 10, 20)), expected)


def test_a_global_step_without_a_chunked_form_is_refused_over_its_size_limit(monkeypatch):
    from vesuvius_lab.core import errors
    from vesuvius_lab.core.inference import global_pass

    monkeypatch.setattr(global_pass, "WHOLE_ARRAY_VOXELS", 1000)
    chain = build_chain([{"plugin": "plug_holes"}], threshold=THRESHOLD)
    with pytest.raises(errors.UserError, match="no chunked form.*--bbox"):
        global_pass.chunked_steps(chain.steps, threshold=THRESHOLD, voxels=8000)


@pytest.mark.parametrize("region, unit", [(((0, 0, 0), (100, 70, 33)), (32, 32, 32)),
                                          (((5, 40, 1), (300, 41, 200)), (16, 8, 64))])
def test_pass_chunks_cover_the_region_and_end_on_the_output_chunk_grid(region, unit):
    box = Box(*region)
    chunks = pass_chunks(box, unit)
    for axis, sizes in enumerate(chunks):
        assert sum(sizes) == box.shape[axis] and min(sizes) > 0
        edges = np.cumsum(sizes)[:-1] + box.start[axis]
        assert all(edge % unit[axis] == 0 for edge in edges)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_chunked_labels_are_the_components_of_scipy_and_dask_image(connectivity):
    """The same partition of the voxels (labels may be numbered otherwise), with components that cross
    chunk faces, edges and corners."""
    from dask_image import ndmeasure

    from vesuvius_lab.core.inference import chunked

    mask = sheets((21, 26, 19), seed=connectivity) > 0.62
    expected, count = ndimage.label(mask, chunked.structure(connectivity))
    with dask.config.set(scheduler="synchronous"):
        labels, found = chunked.label(da.from_array(mask, chunks=(7, 9, 6)), connectivity)
        labels = labels.compute()
        # dask-image's graph grows with the square of the chunks (36 chunks: seconds); 8 give it the same answer
        peer = ndmeasure.label(da.from_array(mask, chunks=(11, 13, 10)), chunked.structure(connectivity))[0].compute()
    assert found == count > 10
    for other in (labels, peer):
        pairs = np.unique(np.stack([expected.ravel(), other.ravel()]), axis=1)
        assert len(pairs[0]) == count + 1 and len(np.unique(pairs[1])) == count + 1  # one to one
