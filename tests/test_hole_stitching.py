"""The hole-stitching UNet: corruption, loss, checkpoints, the plugin, and a small real training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from vesuvius_lab.core import registry
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.plugins.hole_stitching import (CorruptionParams, StitcherNetParams, StitcherWindows,
                                                 build_stitcher_network, fit_hole_stitcher, load_stitcher, pack_inputs,
                                                 punch_holes, stitcher_loss, unpack_inputs)

TINY_NET = StitcherNetParams(channels=(8, 16, 32))


def sheets(shape=(48, 48, 48), seed=0, spacing=16, half_thickness=1.5) -> np.ndarray:
    """A label of parallel wavy sheets (random waves per seed), 3 voxels thick, ignore label on two faces."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(np.float32)
    a, b = rng.uniform(1, 3, 2)
    p, q = rng.uniform(8, 16, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    height = z + a * np.sin(x / p + phase[0]) + b * np.cos(y / q + phase[1]) + rng.uniform(0, spacing)
    label = (np.abs(height % spacing - spacing / 2) < half_thickness).astype(np.uint8)
    label[:2] = 2
    label[-2:] = 2
    return label


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    valid = label != 2
    pred, truth = (pred != 0) & valid, label == 1
    return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())


# --------------------------------------------------------------------------- corruption


def test_punch_holes_removes_only_surface_and_adds_requested_dust():
    label = sheets(shape=(32, 32, 32))                             # one damage block
    surface = label == 1
    holed = punch_holes(label, np.random.default_rng(0), holes=(6, 6), radius=(3, 3))
    assert holed.dtype == np.uint8
    assert not (holed.astype(bool) & ~surface).any()               # nothing added, the ignore label is background
    assert 6 * 20 <= surface.sum() - holed.sum() <= 6 * 123        # six balls of radius 3 cut out of the sheets
    again = punch_holes(label, np.random.default_rng(0), holes=(6, 6), radius=(3, 3))
    np.testing.assert_array_equal(holed, again)


def test_a_whole_volume_is_damaged_as_densely_as_a_training_window():
    window, volume = sheets(shape=(32, 32, 32), seed=3), sheets(shape=(64, 64, 64), seed=3)
    lost = [((v == 1).sum() - punch_holes(v, np.random.default_rng(0), holes=(4, 4), radius=(1, 1)).sum())
            / (v == 1).sum() for v in (window, volume)]
    assert 0.5 < lost[1] / lost[0] < 2                             # eight blocks get eight times the holes


def test_dust_and_thinning():
    label = sheets()
    surface = label == 1

    dusty = punch_holes(label, np.random.default_rng(1), holes=(0, 0), dust=(5, 5), dust_radius=1)
    assert (dusty.astype(bool) & ~surface).sum() > 0 and (dusty.astype(bool) >= surface).all()

    thinned = punch_holes(label, np.random.default_rng(2), holes=(0, 0), erode_probability=1.0)
    assert 0 < thinned.sum() < surface.sum() * 0.6                 # 3-voxel sheets keep their middle layer


def test_windows_sample_shapes_targets_and_ignore():
    label = sheets(shape=(20, 30, 30))                              # smaller than the window along one axis
    windows = StitcherWindows([label], (24, 24, 24))
    inputs, target, valid = windows.batch(3, np.random.default_rng(0), CorruptionParams(holes=(2, 2)))
    assert inputs.shape == (3, 1, 24, 24, 24) and target.shape == valid.shape == (3, 1, 24, 24, 24)
    assert valid.dtype == bool and not valid.all()                  # the padding and faces are ignored
    assert (inputs <= target).all()                                 # holes only: inputs are a subset of targets
    assert (inputs < target).any()

    two = StitcherWindows([label], (24, 24, 24), probabilities=[np.full(label.shape, 0.7, np.float32)])
    inputs, _, _ = two.batch(2, np.random.default_rng(0), CorruptionParams(), in_channels=2)
    assert inputs.shape == (2, 2, 24, 24, 24) and inputs[:, 1].max() <= 0.7


# --------------------------------------------------------------------------- network and loss


def test_pack_and_unpack_two_channels_exactly():
    rng = np.random.default_rng(0)
    mask = (rng.random((6, 7, 8)) > 0.5).astype(np.uint8)
    prob = rng.random((6, 7, 8)).astype(np.float32)
    prob[0, 0, 0], prob[0, 0, 1] = 1.0, 0.0
    packed = torch.from_numpy(pack_inputs(mask, prob))[None, None]
    both = unpack_inputs(packed, 2)[0].numpy()
    np.testing.assert_array_equal(both[0], mask)
    np.testing.assert_allclose(both[1], prob, atol=1e-6)
    np.testing.assert_array_equal(unpack_inputs(packed, 1)[0, 0].numpy(), mask)


def test_loss_ignores_the_ignore_label_and_prefers_the_label():
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.int64)
    label[..., 7:10, :, :] = 1                                      # a sheet, 3 voxels thick
    label[..., :2] = 2                                              # the ignore label on one face
    target, valid = (label == 1).float(), label != 2
    exact = 8.0 * (2 * target - 1)
    holed = exact.clone()
    holed[..., 6:10, 6:10, 6:10] = -8.0
    assert stitcher_loss(holed, target, valid) > stitcher_loss(exact, target, valid) + 1e-3
    changed = exact.clone()
    changed[~valid] = -exact[~valid]                                # wrong, but only where ignored
    assert torch.isclose(stitcher_loss(changed, target, valid), stitcher_loss(exact, target, valid))
    assert stitcher_loss(holed, target, valid, gradient_weight=2.0) > stitcher_loss(holed, target, valid)

    bce = stitcher_loss(holed, target, valid, gradient_weight=0.0, reconstruction="bce")
    expected = torch.nn.functional.binary_cross_entropy_with_logits(holed[valid], target[valid])
    assert torch.isclose(bce, expected)
    assert torch.isclose(stitcher_loss(changed, target, valid, gradient_weight=0.0, reconstruction="bce"),
                         stitcher_loss(exact, target, valid, gradient_weight=0.0, reconstruction="bce"))
    with pytest.raises(ValueError, match="l1"):
        stitcher_loss(exact, target, valid, reconstruction="l2")


@pytest.mark.parametrize("in_channels", [1, 2])
def test_network_maps_windows_to_logits_plus_the_input_mask(in_channels):
    x = torch.zeros(2, in_channels, 16, 16, 16)
    x[:, 0, 8] = 1
    outputs = {}
    for gain in (0.0, 2.0):
        torch.manual_seed(0)
        net = build_stitcher_network(StitcherNetParams(in_channels=in_channels, channels=(4, 8), identity_gain=gain))
        outputs[gain] = net(x)
    assert outputs[0.0].shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(outputs[2.0] - outputs[0.0], 2.0 * (2 * x[:, :1] - 1))


# --------------------------------------------------------------------------- checkpoints and the plugin


def test_checkpoint_round_trip_and_run_folders(tmp_path):
    state = fit_hole_stitcher([sheets(shape=(24, 24, 24))], window=(16, 16, 16), iterations=2, batch_size=1,
                              network=StitcherNetParams(channels=(4, 8)), progress=False,
                              checkpoint=tmp_path / "s.pt")
    model, params, window = load_stitcher(tmp_path / "s.pt")
    assert params.channels == (4, 8) and window == (16, 16, 16)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    # A run's checkpoint (the training loop's format) found through runs_dir.
    run = tmp_path / "runs" / "stitcher" / "r1" / "checkpoints"
    run.mkdir(parents=True)
    (run.parent / "spec.json").write_text("{}")  # what makes a folder a run
    torch.save({"model": state, "model_params": params.model_dump(mode="json"), "model_plugin": "x"},
               run / "best.pt")
    mask = (sheets(shape=(20, 24, 24)) == 1).astype(np.uint8)
    by_run = registry.build("postprocessors", "hole_stitching_unet", {"run": "stitcher/r1", "window": [16, 16, 16]},
                            device="cpu", runs_dir=tmp_path / "runs", threshold=0.5)
    by_file = registry.build("postprocessors", "hole_stitching_unet", {"checkpoint": str(tmp_path / "s.pt")},
                             device="auto", runs_dir=None, threshold=0.5)
    np.testing.assert_array_equal(by_run(mask), by_file(mask))
    assert by_file(mask).dtype == np.uint8 and (by_file(mask) >= mask).all()  # near: never removes a voxel

    with pytest.raises(UserError, match="not a run directory"):
        registry.build("postprocessors", "hole_stitching_unet", {"run": "stitcher/missing"},
                       device="cpu", runs_dir=tmp_path / "runs", threshold=0.5)
    with pytest.raises(UserError, match="multiple of 2"):
        registry.build("postprocessors", "hole_stitching_unet",
                       {"checkpoint": str(tmp_path / "s.pt"), "window": [15, 16, 16]},
                       device="cpu", runs_dir=None, threshold=0.5)
    with pytest.raises(ValidationError):
        registry.validate_params("postprocessors", "hole_stitching_unet", {})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_stitcher(tmp_path / "junk.pt")


def test_two_channel_stitcher_uses_probabilities(tmp_path):
    label = sheets(shape=(24, 24, 24))
    prob = np.where(label == 1, 0.8, 0.1).astype(np.float32)
    fit_hole_stitcher([label], window=(16, 16, 16), iterations=2, batch_size=1, probabilities=[prob],
                      network=StitcherNetParams(in_channels=2, channels=(4, 8)), progress=False,
                      checkpoint=tmp_path / "s2.pt")
    step = registry.build("postprocessors", "hole_stitching_unet", {"checkpoint": str(tmp_path / "s2.pt")},
                          device="cpu", runs_dir=None, threshold=0.5)
    out = step(prob)
    assert out.shape == prob.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="probability"):
        fit_hole_stitcher([label], window=(16, 16, 16), iterations=1,
                          network=StitcherNetParams(in_channels=2, channels=(4, 8)), progress=False)


# --------------------------------------------------------------------------- training that works


def test_trained_stitcher_closes_holes_in_a_held_out_label(tmp_path):
    """A few hundred iterations on three synthetic volumes; judged on a volume with other waves."""
    torch.set_num_threads(2)
    train = [sheets(seed=seed) for seed in (0, 1, 2)]
    fit_hole_stitcher(train, window=(24, 24, 24), iterations=300, batch_size=4, lr=5e-3, network=TINY_NET,
                      corruption=CorruptionParams(holes=(2, 5), radius=(2, 5)), damage_weight=5.0,
                      progress=False, checkpoint=tmp_path / "stitcher.pt", seed=0)

    held_out = sheets(seed=99)
    damaged = punch_holes(held_out, np.random.default_rng(5), holes=(15, 15), radius=(3, 5))
    step = registry.build("postprocessors", "hole_stitching_unet", {"checkpoint": str(tmp_path / "stitcher.pt")},
                          device="cpu", runs_dir=None, threshold=0.5)
    stitched = step(damaged)

    holes = (held_out == 1) & (damaged == 0)
    restored = (stitched[holes] == 1).mean()
    before, after = dice(damaged, held_out), dice(stitched, held_out)
    print(f"Dice {before:.4f} -> {after:.4f}; {restored:.1%} of {holes.sum()} hole voxels restored")
    assert restored > 0.5
    assert after > before + 0.005
