"""The sliding-window engine against MONAI's sliding_window_inference, plus TTA, axes and seams."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.spec import InferenceSpec, PluginRef
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.engine import (clear_weight_maps, padding, predict_volume, sliding_window, tile,
                                                weight_map, weight_map_cache_info, window_starts)

torch.set_num_threads(1)


def conv_net(out_channels: int = 2, seed: int = 0) -> torch.nn.Module:
    """A small random 3D conv net: its output depends on neighbours and on zero padding at window edges."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv3d(4, out_channels, 3, padding=1)).eval()


def per_voxel(x: torch.Tensor) -> torch.Tensor:
    """An equivariant predictor: the same function at every voxel, two channels."""
    return torch.cat([torch.sin(3 * x), x * x], dim=1)


def coordinate(axis: int):
    """A predictor whose output is the input plus each voxel's coordinate along ``axis`` of the window."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        shape = [1] * 5
        shape[2 + axis] = x.shape[2 + axis]
        return x + torch.arange(x.shape[2 + axis], dtype=x.dtype).reshape(shape)

    return predict


def monai(volume: np.ndarray, predictor, window, overlap, mode, batch_size=3, **kwargs) -> np.ndarray:
    with torch.inference_mode():
        out = sliding_window_inference(torch.from_numpy(volume)[None, None], window, batch_size, predictor,
                                       overlap=overlap, mode=mode, **kwargs)
    return out[0].numpy()


def random_volume(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# --- window layout -------------------------------------------------------------------------------

LAYOUTS = [((13, 17, 20), (5, 8, 9), (0.5, 0.5, 0.5)),
           ((9, 9, 9), (3, 4, 5), (0.3, 0.6, 0.9)),
           ((32, 31, 33), (16, 16, 16), (0.25, 0.0, 0.75)),
           ((8, 8, 8), (8, 8, 8), (0.5, 0.5, 0.5))]


@pytest.mark.parametrize("shape, window, overlap", LAYOUTS)
def test_windows_cover_the_volume_and_the_last_is_flush(shape, window, overlap):
    windows = tile(shape, window, overlap)
    covered = np.zeros(shape, int)
    for where in windows:
        assert all(s.stop - s.start == w for s, w in zip(where, window))
        covered[where] += 1
    assert covered.min() >= 1
    for axis in range(3):
        starts = window_starts(shape[axis], window[axis], overlap[axis])
        assert starts[0] == 0 and starts[-1] + window[axis] == shape[axis]
        assert starts == sorted(set(starts))


@pytest.mark.parametrize("shape, window, overlap", LAYOUTS)
def test_windows_are_where_monai_puts_them(shape, window, overlap):
    interval = _get_scan_interval(shape, window, 3, overlap)
    assert tile(shape, window, overlap) == dense_patch_slices(shape, window, interval)


def test_padding_splits_the_deficit_like_monai():
    assert padding((5, 8, 20), (8, 8, 9)) == [(1, 2), (0, 0), (0, 0)]
    assert padding((1, 2, 3), (4, 6, 4)) == [(1, 2), (2, 2), (0, 1)]
    assert window_starts(3, 8, 0.5) == [0]


# --- equality with MONAI -------------------------------------------------------------------------

SHAPES = [(13, 17, 20), (9, 23, 11), (6, 7, 30), (3, 5, 4)]  # the last two are thinner than the window


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blender, mode", [("gaussian", "gaussian"), ("mean", "constant")])
def test_equals_monai(shape, blender, mode):
    volume, net = random_volume(shape), conv_net()
    ours = sliding_window(volume, net, window=(8, 8, 9), overlap=0.5, blender=blender, batch_size=3)
    theirs = monai(volume, net, (8, 8, 9), 0.5, mode)
    assert ours.dtype == np.float32 and ours.shape == (2, *shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_equals_monai_with_per_axis_overlap_and_sigma():
    volume, net = random_volume((15, 12, 21), seed=1), conv_net(out_channels=1, seed=1)
    ours = sliding_window(volume, net, window=(6, 7, 8), overlap=(0.25, 0.6, 0.8), blender="gaussian",
                          blender_params={"sigma_scale": (0.2, 0.3, 0.1)}, batch_size=5)
    theirs = monai(volume, net, (6, 7, 8), (0.25, 0.6, 0.8), "gaussian", batch_size=5, sigma_scale=(0.2, 0.3, 0.1))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_a_volume_smaller_than_the_window_is_padded_with_zeros_where_monai_pads():
    seen = []

    def record(x):
        seen.append(x.clone())
        return x

    volume = random_volume((3, 5, 4)) + 1  # no zeros inside, so padding is recognisable
    ours = sliding_window(volume, record, window=(8, 8, 8), overlap=0.5)
    (window,) = seen
    inside = window[0, 0] != 0
    before = [int(np.nonzero(inside.any(dim=tuple(a for a in range(3) if a != axis)).numpy())[0][0])
              for axis in range(3)]
    assert before == [2, 1, 2]  # (8 - n) // 2 voxels of zeros before the volume on each axis
    np.testing.assert_allclose(ours[0], volume, atol=1e-6)
    np.testing.assert_allclose(ours, monai(volume, lambda x: x, (8, 8, 8), 0.5, "gaussian"), atol=1e-6)


def test_uint8_is_converted_to_float32_and_scaled_per_batch():
    seen = []

    def record(x):
        seen.append((x.dtype, x.device, x.shape[0]))
        return x

    volume = np.random.default_rng(2).integers(0, 256, (10, 12, 14), dtype=np.uint8)
    ours = sliding_window(volume, record, window=(4, 6, 6), overlap=0.5, batch_size=4, scale=1 / 255)
    np.testing.assert_allclose(ours[0], volume / 255, atol=1e-6)
    windows = len(tile(volume.shape, (4, 6, 6), (0.5, 0.5, 0.5)))
    assert sum(batch for *_, batch in seen) == windows and max(batch for *_, batch in seen) == 4
    assert {(dtype, device.type) for dtype, device, _ in seen} == {(torch.float32, "cpu")}
    unscaled = sliding_window(torch.from_numpy(volume), record, window=(4, 6, 6), overlap=0.5)
    np.testing.assert_allclose(unscaled[0], volume, atol=1e-4)  # as-is without a scale


# --- TTA and axes --------------------------------------------------------------------------------

ALL_TTA = ("flip0", "flip1", "flip2", "rot90")


def test_tta_with_an_equivariant_predictor_changes_nothing():
    volume = random_volume((11, 14, 13))
    plain = sliding_window(volume, per_voxel, window=(5, 8, 8), overlap=0.5)
    augmented = sliding_window(volume, per_voxel, window=(5, 8, 8), overlap=0.5, tta=ALL_TTA)
    np.testing.assert_allclose(augmented, plain, atol=1e-6)
    np.testing.assert_allclose(plain, per_voxel(torch.from_numpy(volume)[None, None])[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flips_are_mapped_back(axis):
    # One window covers the volume. The identity adds i, the flipped pass adds n-1-i once mapped
    # back: their average is the input plus (n-1)/2 everywhere. Unmapped, it would mix x with flip(x).
    shape = (5, 6, 7)
    volume = random_volume(shape)
    out = sliding_window(volume, coordinate(axis), window=shape, overlap=0.5, blender="mean", tta=(f"flip{axis}",))
    np.testing.assert_allclose(out[0], volume + (shape[axis] - 1) / 2, atol=1e-5)


def test_rotations_are_mapped_back():
    # Identity plus the three in-plane rotations: h + 10 w averages to 5.5 (n - 1) at every voxel.
    shape = (3, 6, 6)
    volume = random_volume(shape)

    def position(x):
        h = torch.arange(6, dtype=x.dtype).reshape(1, 1, 1, 6, 1)
        w = torch.arange(6, dtype=x.dtype).reshape(1, 1, 1, 1, 6)
        return x + h + 10 * w

    out = sliding_window(volume, position, window=shape, overlap=0.5, blender="mean", tta=("rot90",))
    np.testing.assert_allclose(out[0], volume + 5.5 * 5, atol=1e-4)


def test_each_axis_becomes_the_depth_axis_in_turn():
    # One window covers the cube. Pass k adds the coordinate along volume axis k; the mean of the
    # three passes adds (i0 + i1 + i2) / 3 only if every pass is transposed back correctly.
    volume = random_volume((6, 6, 6))
    out = sliding_window(volume, coordinate(0), window=(6, 6, 6), overlap=0.5, blender="mean", axes=(0, 1, 2))
    i0, i1, i2 = np.meshgrid(*[np.arange(6)] * 3, indexing="ij")
    np.testing.assert_allclose(out[0], volume + (i0 + i1 + i2) / 3, atol=1e-5)


def test_axes_on_an_uneven_volume_with_an_equivariant_predictor():
    volume = random_volume((7, 10, 13))
    out = sliding_window(volume, per_voxel, window=(3, 8, 8), overlap=0.5, axes=(0, 1, 2), tta=("flip1",))
    np.testing.assert_allclose(out, per_voxel(torch.from_numpy(volume)[None, None])[0].numpy(), atol=1e-6)
    single = sliding_window(volume, per_voxel, window=(3, 8, 8), overlap=0.5, axes=(2,))
    assert single.shape == (2, 7, 10, 13)


# --- seams, cache, progress ----------------------------------------------------------------------

def sawtooth(x: torch.Tensor) -> torch.Tensor:
    """Ignores the input; rises from 0 to 1 across each window along W, like a model biased by position."""
    w = x.shape[-1]
    return torch.linspace(0, 1, w).reshape(1, 1, 1, 1, w).expand(x.shape[0], 1, *x.shape[2:]).clone()


def test_gaussian_blending_leaves_no_seams_where_tiling_does():
    volume = np.zeros((8, 8, 64), np.float32)

    def largest_step(overlap, blender):
        out = sliding_window(volume, sawtooth, window=(8, 8, 16), overlap=overlap, blender=blender)
        # The central row: there the D and H weights are the same for every window along W (no floor).
        return np.abs(np.diff(out[0, 4, 4])).max()

    own_slope = 1 / 15
    assert largest_step(0.0, "mean") == pytest.approx(1.0)  # tiling: 1 next to 0 at every window edge
    assert largest_step(0.5, "mean") == pytest.approx(7 / 15)  # overlapping plain averages still step
    assert largest_step(0.5, "gaussian") < 0.2  # steps spread over a few voxels
    assert largest_step(0.75, "gaussian") == pytest.approx(own_slope, rel=1e-3)  # no step beyond the ramp's own


def test_weight_map_is_built_once_per_window_and_device():
    clear_weight_maps()
    volume = random_volume((10, 12, 12))
    for _ in range(2):
        sliding_window(volume, per_voxel, window=(4, 6, 6), overlap=0.5, tta=ALL_TTA, axes=(0, 1, 2))
    info = weight_map_cache_info()
    assert info.misses == 1 and info.hits >= 1
    assert weight_map("gaussian", None, (4, 6, 6)) is weight_map("gaussian", {}, (4, 6, 6), "cpu")
    sliding_window(volume, per_voxel, window=(4, 6, 7), overlap=0.5)
    assert weight_map_cache_info().misses == 2


def test_progress_bar_gives_the_same_result():
    volume = random_volume((8, 9, 10))
    np.testing.assert_array_equal(
        sliding_window(volume, per_voxel, window=(4, 4, 4), overlap=0.5, progress=True),
        sliding_window(volume, per_voxel, window=(4, 4, 4), overlap=0.5))


# --- predict_volume ------------------------------------------------------------------------------

def test_predict_volume_blends_probabilities_in_eval_mode():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Dropout(0.5),
                                torch.nn.Conv3d(4, 1, 3, padding=1)).train()
    volume = np.random.default_rng(3).integers(0, 256, (9, 14, 15), dtype=np.uint8)
    spec = InferenceSpec(window=(4, 8, 8), overlap=0.5, blend=PluginRef(plugin="ramp", params={"margin": 0.3}),
                         batch_size=2, tta=["flip2"])
    first = predict_volume(volume, model, spec)
    assert model.training  # the caller's mode is restored
    np.testing.assert_array_equal(predict_volume(volume, model, spec), first)  # no dropout: deterministic
    model.eval()
    expected = sliding_window(volume, lambda x: torch.sigmoid(model(x)), window=(4, 8, 8), overlap=0.5,
                              blender="ramp", blender_params={"margin": 0.3}, batch_size=2, tta=["flip2"],
                              scale=1 / 255)[0]
    assert first.shape == volume.shape and first.dtype == np.float32
    np.testing.assert_allclose(first, expected, atol=1e-6)


def test_predict_volume_takes_softmax_channel_one_and_the_window_argument():
    net = conv_net(out_channels=2)
    volume = np.random.default_rng(4).integers(0, 256, (6, 9, 9), dtype=np.uint8)
    out = predict_volume(volume, net, InferenceSpec(overlap=0.25), window=(4, 6, 6))
    expected = sliding_window(volume, lambda x: torch.softmax(net(x), 1)[:, 1:], window=(4, 6, 6), overlap=0.25,
                              scale=1 / 255)[0]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(UserError, match="sigmoid"):
        predict_volume(volume, conv_net(out_channels=3), InferenceSpec(), window=(4, 6, 6))


# --- errors a user can cause ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"overlap": 1.0}, "overlap"),
    ({"overlap": (0.5, 0.5)}, "overlap"),
    ({"window": (4, 0, 4)}, "window"),
    ({"tta": ("flip3",)}, "Did you mean"),
    ({"window": (4, 4, 6), "tta": ("rot90",)}, "square"),
    ({"axes": (0, 0)}, "axes"),
    ({"axes": (3,)}, "axes"),
    ({"batch_size": 0}, "batch size"),
    ({"blender": "gausian"}, 'Did you mean "gaussian"'),
    ({"blender_params": {"sigma": 0.2}}, "sigma: Extra inputs"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    arguments = {"window": (4, 4, 4), "overlap": 0.5, **kwargs}
    with pytest.raises(UserError, match=message):
        sliding_window(random_volume((6, 6, 6)), per_voxel, **arguments)


def test_a_predictor_of_the_wrong_shape_is_a_user_error():
    with pytest.raises(UserError, match="window's spatial shape"):
        sliding_window(random_volume((6, 6, 6)), lambda x: x[..., :2], window=(4, 4, 4), overlap=0.5)
    with pytest.raises(UserError, match="3D"):
        sliding_window(random_volume((6, 6)), per_voxel, window=(4, 4, 4), overlap=0.5)


# --- a third party's blender ---------------------------------------------------------------------

@pytest.fixture
def third_party_blenders(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path) declaring two blenders by entry point."""
    (tmp_path / "vlab_extra_blenders.py").write_text(textwrap.dedent("""
        import numpy as np
        from vesuvius_lab.core.registry import plugin

        @plugin()
        def twos(params, *, window, **context):
            "Uniform weights of 2."
            return np.full(window, 2.0, np.float32)

        @plugin()
        def zeros(params, *, window, **context):
            "Broken: zero weights."
            return np.zeros(window, np.float32)
    """))
    info = tmp_path / "vlab_extra_blenders-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlab-extra-blenders\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[vesuvius_lab.blenders]\ntwos = vlab_extra_blenders:twos\nzeros = vlab_extra_blenders:zeros\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield
    monkeypatch.undo()
    sys.modules.pop("vlab_extra_blenders", None)
    registry.refresh()
    clear_weight_maps()


def test_a_third_party_blender_plugs_in_by_entry_point(third_party_blenders):
    volume, net = random_volume((9, 10, 11)), conv_net()
    np.testing.assert_allclose(sliding_window(volume, net, window=(4, 5, 6), overlap=0.5, blender="twos"),
                               sliding_window(volume, net, window=(4, 5, 6), overlap=0.5, blender="mean"),
                               atol=1e-6)
    with pytest.raises(UserError, match="strictly positive"):
        sliding_window(volume, net, window=(4, 5, 6), overlap=0.5, blender="zeros")
