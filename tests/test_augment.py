"""Training augmentation ([data.augment], MONAI's transforms): alignment of image and label, padding
as ignore, intensity transforms leave the label alone, configuration, seeding, skeleton targets."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from monai.transforms import Rand3DElasticd
from scipy import ndimage

from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.config.spec import Augment
from vesuvius_lab.core.data.augment import FastRand3DElasticd, PatchAugmenter
from vesuvius_lab.core.data.sampling import PatchSource, PatchStream
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


def test_skeleton_targets_are_yielded_when_asked():
    stream = PatchStream(sources(), WINDOW, foreground_share=1.0, switches=Augment(), seed=0, skeleton=True)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=2))
    image, label, skeleton = next(loader)
    assert image.shape == label.shape == skeleton.shape == (2, 1, *WINDOW) and skeleton.dtype == torch.uint8
    assert skeleton.any() and (skeleton.bool() <= (label == 1)).all()
    for one_label, one_skeleton in zip(label, skeleton):
        np.testing.assert_array_equal(one_skeleton[0].numpy(), skeleton_target(one_label[0].numpy(), 2, 1))
    assert len(next(iter(PatchStream(sources(), WINDOW, foreground_share=1.0, switches=Augment(), seed=0)))) == 2
