"""Block-wise prediction equals the whole volume's: the block plan, exact blocks, the chain's halos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.spec import InferenceSpec, PluginRef
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.blocks import ArrayReader, BlockPlan, Box, halo_windows, parse_bbox, predict_block
from vesuvius_lab.core.inference.engine import predict_volume
from vesuvius_lab.core.inference.postprocess import build_chain
from vesuvius_lab.core.inference.run_kinds import load_run
from vesuvius_lab.core.inference.volume_predict import chain_parts, default_block

SHAPE = (23, 37, 41)  # multiples of nothing
INFERENCE = {
    "plain": {"window": [8, 16, 16], "overlap": 0.5},
    "tta and 2.5D axes": {"window": [8, 16, 16], "overlap": 0.25, "tta": ["flip0", "flip2"], "axes": [0, 1, 2],
                          "blend": {"plugin": "mean"}},
    "window past the volume": {"window": [32, 16, 48], "overlap": [0.5, 0.25, 0.5]},
}
REGIONS = {"whole": None, "box": Box((3, 5, 7), (20, 30, 40)), "thin": Box((11, 0, 40), (12, 37, 41))}


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 1, 3, padding=1)).eval()


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)


def blockwise(reader, region: Box, block, predict) -> np.ndarray:
    out = np.full(reader.shape, np.nan, np.float32)
    for item in BlockPlan(reader.shape, region, block).blocks():
        out[item.core.slices] = predict(reader, item.core)
    return out


@pytest.mark.parametrize("settings", list(INFERENCE))
def test_blocks_equal_the_whole_volume_for_every_block_size_and_box(settings, network, volume):
    spec = InferenceSpec.model_validate(INFERENCE[settings])
    whole = predict_volume(volume, network, spec)
    reader = ArrayReader(volume)
    # Small blocks for the plain settings; larger (still odd) ones where TTA and three axes make each costly.
    blocks = [(5, 7, 9), (8, 8, 8), (64, 64, 64)] if settings == "plain" else [(12, 13, 17), (9, 19, 23), (64, 64, 64)]
    for block, (name, region) in zip(blocks, REGIONS.items()):
        region = region or Box.of_shape(SHAPE)
        out = blockwise(reader, region, block, lambda r, core: predict_block(r, core, network, spec))
        assert not np.isnan(out[region.slices]).any(), (block, name)
        difference = np.abs(out[region.slices] - whole[region.slices]).max()
        assert difference <= 1e-5, (settings, block, name, difference)


def test_a_trained_2_5d_run_predicts_blocks_as_it_predicts_the_whole_volume(tiny_run, synth_data):
    from vesuvius_lab.core.data.tiff import read_volume

    predictor = load_run(tiny_run)
    volume = read_volume(sorted((synth_data / "test_images").glob("*.tif"))[0])
    whole = predictor.probabilities(volume)
    region = Box((1, 3, 5), (volume.shape[0] - 2, volume.shape[1] - 1, volume.shape[2]))
    out = blockwise(ArrayReader(volume), region, (16, 16, 16), predictor.blocks)
    assert np.abs(out[region.slices] - whole[region.slices]).max() <= 1e-5


def test_the_plan_covers_its_region_once_on_a_grid_anchored_at_the_origin():
    region = Box((5, 0, 130), (300, 100, 131))
    plan = BlockPlan((301, 100, 200), region, (128, 64, 128))
    cover = np.zeros((301, 100, 200), np.uint8)
    for block in plan.blocks():
        cover[block.core.slices] += 1
        for start, stop, side, index in zip(block.core.start, block.core.stop, plan.block, block.index):
            assert index * side <= start < stop <= (index + 1) * side  # inside its grid cell: chunks never shared
    assert len(plan) == 3 * 2 * 1 == len(list(plan.blocks()))
    assert cover[region.slices].min() == 1 and cover.sum() == region.size


@pytest.mark.parametrize("text, message", [
    ("0:10,0:10", "three ranges"), ("0:10,0:10,5:x", "not two whole numbers"),
    ("0:10,0:10,0:500", "x range 0:500 is not inside"), ("10:5,0:10,0:10", "z range 10:5"),
])
def test_a_bad_bbox_is_a_message(text, message):
    with pytest.raises(UserError, match=message):
        parse_bbox(text, (100, 100, 100))


def test_an_open_bbox_bound_is_the_volume_edge():
    assert parse_bbox(":10, 5:, :", (20, 30, 40)) == Box((0, 5, 0), (10, 30, 40))


class _Chain:
    def __init__(self, steps):
        self.chain = build_chain(steps, threshold=0.5)
        self.run = type("run", (), {"path": "runs/x/fold0"})()


def test_a_chain_is_cut_before_its_first_global_step_and_the_blocks_halo_adds_the_local_ones():
    local = [{"plugin": "dilate", "params": {"radius": 2, "iterations": 2}}, {"plugin": "median"},
             {"plugin": "fill_holes", "params": {"mode": "closing", "radius": 3}}, {"plugin": "threshold"}]
    steps, rest, halo = chain_parts(_Chain(local), probabilities=False)
    assert (len(steps), rest, halo) == (4, (), 4 + 1 + 6 + 0)
    dust = {"plugin": "remove_small_components", "params": {"min_voxels": 5}}
    assert chain_parts(_Chain(local + [dust]), probabilities=True) == ((), (), 0)  # probabilities: no chain runs
    steps, rest, halo = chain_parts(_Chain(local + [dust, {"plugin": "erode"}]), probabilities=False)
    assert (len(steps), [s.ref.plugin for s in rest], halo) == (4, ["remove_small_components", "erode"], 11)
    steps, rest, halo = chain_parts(_Chain([{"plugin": "threshold", "params": {"low": 0.3, "high": 0.6}}, *local]),
                                    probabilities=False)
    assert (steps, len(rest), halo) == ((), 5, 0)  # hysteresis joins components: global from the first step


@pytest.mark.parametrize("name, params", [("dilate", {"radius": 2}), ("erode", {"radius": 1, "iterations": 2}),
                                          ("median", {"iterations": 2}), ("smooth", {"sigma": 0.8}),
                                          ("sheetness", {"sigmas": [1.0]}),
                                          ("close", {"radius_depth": 1, "radius_plane": 2}),
                                          ("fill_holes", {"mode": "closing", "radius": 2})])
def test_a_step_with_a_halo_gives_on_blocks_what_it_gives_on_the_whole_volume(name, params):
    rng = np.random.default_rng(1)
    probabilities = rng.random((21, 26, 30)).astype(np.float32) ** 3
    chain = build_chain([PluginRef(plugin=name, params=params)], threshold=0.5)
    halo = registry.load("postprocessors", name).halo_of(params)
    assert isinstance(halo, int) and halo > 0
    whole = chain.apply(probabilities)
    everything = Box.of_shape(probabilities.shape)
    for block in BlockPlan(probabilities.shape, everything, (8, 9, 10)).blocks():
        region = block.core.grow(halo, everything)
        part = chain.apply(probabilities[region.slices])[block.core.relative_to(region)]
        assert np.array_equal(part, whole[block.core.slices]), (name, block.index)


def test_the_default_block_is_chunk_aligned_bounded_and_long_where_windows_step_far():
    spec = InferenceSpec.model_validate({"window": [16, 64, 64], "overlap": 0.5})
    block = default_block(spec, None, 128, None)
    assert all(side % 128 == 0 for side in block)
    assert block == (256, 1024, 1024)  # 32 steps of 8 and of 32 voxels
    assert default_block(InferenceSpec.model_validate({"window": [128, 128, 128], "overlap": 0.5}), None, 128, 256) \
        == (512, 512, 1024)  # 2048 per side halved until at most 2**28 voxels, in multiples of the shard


def test_halo_windows_counts_the_windows_a_block_repeats():
    spec = InferenceSpec.model_validate({"window": [8, 16, 16], "overlap": 0.5})
    whole = halo_windows(Box.of_shape((64, 64, 64)), (64, 64, 64), spec)
    halves = sum(halo_windows(block.core, (64, 64, 64), spec)
                 for block in BlockPlan((64, 64, 64), Box.of_shape((64, 64, 64)), (32, 64, 64)).blocks())
    assert whole == 15 * 7 * 7 and halves == whole + 7 * 7  # one row of windows straddles the cut
