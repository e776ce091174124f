"""Training augmentation ([data.augment], MONAI's transforms): alignment of image and label, padding
as ignore, intensity transforms leave the label alone, configuration, seeding, skeleton targets."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from monai.transforms import Flip, Rand3DElasticd, RandAffined, Rotate90
from scipy import ndimage

from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.config.spec import Augment
from vesuvius_lab.core.data.augment import FastRand3DElasticd, Orientation, PatchAugmenter, SkippingRandAffined
from vesuvius_lab.core.data.loader import Batches, batches_per_transfer
from vesuvius_lab.core.data.sampling import PatchSource, PatchStream, split_targets
from vesuvius_lab.core.data.skeleton import skeleton_target

TRANSFORMS = list(Augment.model_fields)
GEOMETRIC = ["flips", "rot90", "affine", "elastic"]
INTENSITY = [name for name in TRANSFORMS if name not in GEOMETRIC]
EXACT = {"flips", "rot90"}  # moves of whole voxels: no interpolation anywhere
#: The image of each label value (background, surface, ignore), as uint8.
SHADE = np.array([40, 140, 240], np.uint8)
WINDOW = (16, 32, 32)


def only(name: str, **options) -> Augment:
    """Every transform off but ``name``, which always applies."""
    return Augment.model_validate({**{other: 0 for other in TRANSFORMS}, name: {"p": 1.0, **options}})


def blocky_label(shape=WINDOW) -> np.ndarray:
    """Large regions of background, surface and ignore, so most voxels are far from an edge."""
    label = np.zeros(shape, np.uint8)
    label[:, 6:18, :] = 1
    label[3:13, 21:30, 4:28] = 2
    return label


def interior(label: np.ndarray, margin: int = 2) -> np.ndarray:
    """Voxels whose neighbourhood of ``margin`` has a single label value and lies inside the patch: away
    from every edge, where interpolating the image blends neighbouring values (or the padding)."""
    size = 2 * margin + 1
    inside = ndimage.minimum_filter(label, size) == ndimage.maximum_filter(label, size)
    faces = np.ones(label.shape, bool)
    faces[tuple(slice(margin, side - margin) for side in label.shape)] = False
    return inside & ~faces


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_transforms_keep_the_label_where_the_image_says(name):
    label = blocky_label()
    augmenter = PatchAugmenter(only(name), WINDOW)
    moved = 0
    for seed in range(4):
        augmenter.seed(seed)
        image, out = augmenter(SHADE[label], label)
        image, out = image[0].numpy(), out[0].numpy()
        assert image.shape == out.shape == WINDOW and out.dtype == np.uint8
        moved += not np.array_equal(out, label)
        expected = SHADE[out] / 255.0
        if name in EXACT:
            np.testing.assert_allclose(image, expected, atol=1e-6)
            continue
        inside = interior(out)
        padding = inside & (out == 2) & (image < 0.5)  # brought in from outside the patch: ignore, image 0
        assert np.abs(image - expected)[inside & ~padding].max() < 1e-3
        np.testing.assert_allclose(image[padding], 0.0, atol=0.02)
        assert inside.mean() > 0.1  # over a thousand voxels checked
    assert moved >= 2


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_voxels_from_outside_the_patch_become_ignore(name):
    options = {"rotate": 0, "scale": [0.6, 0.6]} if name == "affine" else {"sigma": [3, 3], "magnitude": [3000, 3000]}
    label = np.zeros(WINDOW, np.uint8)  # all background: any 2 afterwards is padding
    augmenter = PatchAugmenter(only(name, **options), WINDOW)
    augmenter.seed(0)
    image, out = augmenter(np.full(WINDOW, 200, np.uint8), label)
    image, out = image[0].numpy(), out[0].numpy()
    assert set(np.unique(out)) == {0, 2}
    assert (image[out == 2] < 200 / 255).all()  # padding is zeros, partly blended in at its edge
    np.testing.assert_allclose(image[out == 0][interior(out)[out == 0]], 200 / 255, atol=1e-5)
    if name == "affine":  # content shrunk to 60%: the centre is still the patch, the faces are outside
        assert out[8, 16, 16] == 0 and out[0, 0, 0] == 2 and out[-1, -1, -1] == 2


@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_transforms_change_the_image_only(name):
    label = blocky_label()
    augmenter = PatchAugmenter(only(name), WINDOW)
    augmenter.seed(1)
    source = np.random.default_rng(0).integers(30, 220, WINDOW).astype(np.uint8)
    image, out = augmenter(source, label)
    np.testing.assert_array_equal(out[0].numpy(), label)
    assert not np.allclose(image[0].numpy(), source / 255.0, atol=1e-3)


def test_hole_stitching_gets_geometric_transforms_only_and_a_binary_image():
    label = blocky_label()
    everything = Augment.model_validate({name: 1.0 for name in TRANSFORMS})
    augmenter = PatchAugmenter(everything, WINDOW, geometric_only=True)
    augmenter.seed(0)
    image, out = augmenter((label == 1).astype(np.uint8) * 255, label)
    assert set(np.unique(image.numpy())) <= {0.0, 1.0}  # nearest resampling, no intensity change
    assert ((image[0] == 1) <= (out[0] == 1)).all()  # the damaged sheet moved with its label


def test_rot90_is_skipped_on_windows_that_are_not_square():
    window = (8, 16, 24)
    label = np.random.default_rng(0).integers(0, 3, window).astype(np.uint8)
    augmenter = PatchAugmenter(only("rot90"), window)
    augmenter.seed(0)
    _, out = augmenter(SHADE[label], label)
    np.testing.assert_array_equal(out[0].numpy(), label)


def test_fast_elastic_gives_monais_output():
    rng = np.random.default_rng(0)
    data = {"image": torch.from_numpy(rng.random((1, *WINDOW), dtype=np.float32)),
            "label": torch.from_numpy(blocky_label()[None].astype(np.float32))}
    options = dict(keys=["image", "label"], sigma_range=(4, 6), magnitude_range=(100, 300), prob=1.0,
                   mode=("bilinear", "nearest"), padding_mode="zeros")
    monai, ours = Rand3DElasticd(**options), FastRand3DElasticd(**options)
    monai.set_random_state(7), ours.set_random_state(7)
    expected, got = monai(data), ours(data)
    assert not torch.equal(got["label"], data["label"])
    torch.testing.assert_close(torch.as_tensor(got["image"]), torch.as_tensor(expected["image"]), atol=1e-5, rtol=0)
    assert torch.equal(torch.as_tensor(got["label"]), torch.as_tensor(expected["label"]))


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_orientation_gives_monais_flips_and_quarter_turns(turns):
    volume = np.random.default_rng(turns).integers(0, 255, WINDOW).astype(np.uint8)
    for flips in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]:
        expected = torch.from_numpy(volume[None].copy())
        for axis, flip in enumerate(flips):
            expected = Flip(spatial_axis=axis)(expected) if flip else expected
        expected = Rotate90(turns, spatial_axes=(1, 2))(expected) if turns else expected
        got = Orientation.apply(volume, flips, turns)
        np.testing.assert_array_equal(got, np.asarray(expected)[0])


def test_orientation_draws_each_flip_and_the_turns_with_their_probabilities():
    orientation = Orientation(0.5, 0.75, quarter_turns=True)
    orientation.set_random_state(0)
    draws = [orientation.draw() for _ in range(4000)]
    flip_rates = np.mean([flips for flips, _ in draws], axis=0)
    turn_counts = np.bincount([turns for _, turns in draws], minlength=4) / len(draws)
    np.testing.assert_allclose(flip_rates, 0.5, atol=0.03)
    np.testing.assert_allclose(turn_counts, 0.25, atol=0.03)  # p = 0.75 over 3 turns: all four equally likely
    assert all(turns == 0 for _, turns in (Orientation(0.5, 0.75, quarter_turns=False).draw() for _ in range(50)))


def test_the_affine_transform_gives_monais_output_and_skips_patches_that_do_not_draw_it():
    """MONAI moves the label shifted by one, as ours does inside: its zeros are the padding, our ignore."""
    rng = np.random.default_rng(0)
    image, label = torch.from_numpy(rng.random((1, *WINDOW), dtype=np.float32)), blocky_label()[None]
    options = dict(keys=["image", "label"], prob=0.5, rotate_range=[0.3] * 3, scale_range=[(-0.2, 0.2)] * 3,
                   mode=("bilinear", "nearest"), padding_mode="zeros", spatial_size=WINDOW, cache_grid=True)
    monai, ours = RandAffined(**options), SkippingRandAffined(**options)
    monai.set_random_state(5), ours.set_random_state(5)
    drawn = 0
    for _ in range(8):
        expected = monai({"image": image, "label": torch.from_numpy(label + 1.0)})
        got = ours({"image": image, "label": torch.from_numpy(label)})
        if got["image"] is image:  # not drawn: passed through untouched, where MONAI only converts
            assert got["label"].dtype == torch.uint8 and np.array_equal(got["label"].numpy(), label)
            torch.testing.assert_close(torch.as_tensor(expected["image"]), image)
            continue
        drawn += 1
        torch.testing.assert_close(torch.as_tensor(got["image"]), torch.as_tensor(expected["image"]), atol=1e-5, rtol=0)
        shifted = torch.as_tensor(expected["label"])
        assert torch.equal(got["label"], torch.where(shifted == 0, 2, shifted - 1).to(torch.uint8))
        assert not np.array_equal(got["label"].numpy(), label)
    assert 2 <= drawn <= 6


# --------------------------------------------------------------------------- configuration


def experiment(tmp_path, augment: str):
    path = tmp_path / "e.toml"
    path.write_text(textwrap.dedent("""\
        name = "x"
        [model]
        plugin = "smp_unet25d"
        [data.augment]
        """) + textwrap.dedent(augment))
    return path


def problems(path) -> list:
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    return info.value.problems


def test_defaults_are_on_with_probabilities_below_one_but_elastic_is_off():
    augment = Augment()
    assert all(0 < getattr(augment, name).p < 1 for name in TRANSFORMS if name != "elastic")
    assert augment.elastic.p == 0  # as in nnU-Net; it costs a CPU loader the most


def test_a_number_is_the_probability_and_a_table_sets_options(tmp_path):
    spec = load_experiment(experiment(tmp_path, """\
        elastic = 0.3
        noise = 0
        affine = { p = 0.5, rotate = [30, 0, 0], scale = [0.9, 1.1] }
        """)).spec
    augment = spec.data.augment
    assert augment.elastic.p == 0.3 and augment.elastic.sigma == Augment().elastic.sigma
    assert augment.noise.p == 0
    assert augment.affine.p == 0.5 and augment.affine.rotate == (30, 0, 0) and augment.affine.scale == (0.9, 1.1)


def test_old_boolean_switches_still_load(tmp_path):
    spec = load_experiment(experiment(tmp_path, """\
        flips = true
        rot90 = false
        intensity = true
        noise = false
        """)).spec
    augment, default = spec.data.augment, Augment()
    assert augment.flips.p == default.flips.p and augment.intensity.p == default.intensity.p
    assert augment.rot90.p == 0 and augment.noise.p == 0


@pytest.mark.parametrize("line, key, words", [
    ("flip = 0.5", "data.augment.flip", 'Did you mean "flips"'),
    ("noise = 1.5", "data.augment.noise", "probability"),
    ("blur = -0.1", "data.augment.blur", "probability"),
    ("gamma = 'often'", "data.augment.gamma", "probability"),
    ("affine = { p = 2 }", "data.augment.affine.p", "less than or equal to 1"),
    ("elastic = { p = 0.1, sigmas = [1, 2] }", "data.augment.elastic.sigmas", 'Did you mean "sigma"'),
    ("contrast = { factor = [1.2, 0.8] }", "data.augment.contrast.factor", "low <= high"),
])
def test_a_bad_augmentation_names_its_key(tmp_path, line, key, words):
    (problem,) = problems(experiment(tmp_path, line))
    assert problem.path == key and words in problem.message and problem.line == 5


# --------------------------------------------------------------------------- the patch stream


def sources(n: int = 2) -> list[PatchSource]:
    rng = np.random.default_rng(0)
    made = []
    for _ in range(n):
        label = blocky_label((20, 40, 40))
        image = (SHADE[label] + rng.integers(0, 10, label.shape)).astype(np.uint8)
        made.append(PatchSource.from_arrays(image, label, rng))
    return made


def patches(stream: PatchStream, n: int) -> list:
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


def test_the_same_seed_gives_the_same_patches():
    volumes = sources()
    make = lambda seed: PatchStream(volumes, WINDOW, foreground_share=0.5, switches=Augment(), seed=seed)  # noqa: E731
    first, again, other = patches(make(3), 6), patches(make(3), 6), patches(make(4), 6)
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    epoch = make(3)
    epoch.set_epoch(1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, patches(epoch, 6)))


def _flipped(array: np.ndarray, flips) -> np.ndarray:
    return np.flip(array, [axis for axis, flip in enumerate(flips) if flip]) if any(flips) else array


def test_skeleton_targets_travel_as_a_second_channel_of_the_targets_moved_with_the_label():
    label = blocky_label()
    label[8:, 20:30, 1:9] = 1  # no symmetry: each flip gives another label
    skeleton = skeleton_target(label)
    volume = PatchSource.from_arrays(SHADE[label], label, np.random.default_rng(0), skeleton=skeleton)
    stream = PatchStream([volume], WINDOW, foreground_share=1.0, switches=only("flips"), seed=0, skeleton=True)
    image, targets = next(iter(torch.utils.data.DataLoader(stream, batch_size=8)))
    patch_label, patch_skeleton = split_targets(targets)
    assert image.shape == patch_label.shape == patch_skeleton.shape == (8, 1, *WINDOW)
    assert patch_skeleton.dtype == torch.uint8 and patch_skeleton.any()
    every_flip = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    for one_label, one_skeleton in zip(patch_label[:, 0].numpy(), patch_skeleton[:, 0].numpy()):
        (flips,) = [f for f in every_flip if np.array_equal(_flipped(label, f), one_label)]
        np.testing.assert_array_equal(one_skeleton, _flipped(skeleton, flips))
    plain = PatchStream([volume], WINDOW, foreground_share=1.0, switches=Augment(), seed=0)
    assert next(iter(plain))[1].shape == (1, *WINDOW)  # no skeleton asked for: the label alone
    with pytest.raises(ValueError, match="skeleton targets were asked for"):
        PatchStream(sources(), WINDOW, foreground_share=1.0, switches=Augment(), seed=0, skeleton=True)


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_resampled_skeleton_targets_stay_inside_the_moved_surface(name):
    label = blocky_label()
    skeleton = skeleton_target(label)
    augmenter = PatchAugmenter(only(name), WINDOW)
    for seed in range(3):
        augmenter.seed(seed)
        _, targets = augmenter(SHADE[label], label, skeleton)
        moved_label, moved_skeleton = targets.numpy()
        assert set(np.unique(moved_skeleton)) <= {0, 1} and moved_skeleton.sum() > 0.5 * skeleton.sum()
        assert not (moved_skeleton.astype(bool) & (moved_label != 1)).any()


@pytest.mark.parametrize("per_transfer", [3, 4])
def test_batches_sent_several_at_a_time_are_the_batches_of_one_at_a_time(per_transfer):
    def stream():
        return PatchStream(sources(), WINDOW, foreground_share=0.5, switches=Augment(), seed=2)

    one, several = Batches(stream(), 2, workers=0), Batches(stream(), 2, workers=0, per_transfer=per_transfer)
    for _ in range(7):
        expected, got = next(one), next(several)
        assert all(torch.equal(a, b) for a, b in zip(expected, got)) and got[0].shape == (2, 1, *WINDOW)


def test_small_patches_share_a_transfer_and_large_ones_do_not():
    assert batches_per_transfer(2, (16, 64, 64), 2) >= 4  # the quick experiments: 0.8 MB a batch
    assert batches_per_transfer(2, (128, 128, 128), 2) == 1
    assert 1 < batches_per_transfer(2, (32, 64, 64), 1) < 8
