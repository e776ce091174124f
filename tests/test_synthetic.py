"""Synthetic scroll volumes and `vlab data synth`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cc3d
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from conftest import run_cli
from scipy import ndimage

from vesuvius_lab.cli import cli
from vesuvius_lab.core.data.dataset import check_dataset
from vesuvius_lab.core.data.synthetic import MARKER, generate_volume, write_dataset
from vesuvius_lab.core.errors import UserError

SHAPE = (32, 64, 64)


@pytest.fixture(scope="module")
def volume():
    return generate_volume(SHAPE, np.random.default_rng(11))


def test_same_seed_gives_the_same_volume_and_another_seed_does_not(volume):
    image, label = generate_volume(SHAPE, np.random.default_rng(11))
    assert np.array_equal(image, volume[0]) and np.array_equal(label, volume[1])
    other_image, _ = generate_volume(SHAPE, np.random.default_rng(12))
    assert not np.array_equal(other_image, image)


def test_volume_types_and_label_values(volume):
    image, label = volume
    assert image.shape == label.shape == SHAPE
    assert image.dtype == label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2}
    assert image.std() > 20  # not a flat image


@pytest.mark.parametrize("border", [1, 3])
def test_every_face_has_an_unlabeled_border(border):
    _, label = generate_volume((16, 24, 24), np.random.default_rng(0), border=border)
    for axis in range(3):
        for face in (slice(0, border), slice(label.shape[axis] - border, None)):
            index = [slice(None)] * 3
            index[axis] = face
            assert (label[tuple(index)] == 2).all()
    inner = label[border:-border, border:-border, border:-border]
    assert (inner != 2).any()


def test_surface_label_lies_on_bright_sheets_over_dark_air(volume):
    image, label = volume
    surface, background = image[label == 1].astype(float), image[label == 0].astype(float)
    assert surface.mean() > background.mean() + 30
    # Air between sheets: a good share of the background is much darker than the surface.
    assert np.mean(background < surface.mean() - 60) > 0.3


def test_surface_label_is_a_thin_membrane_on_several_sheets(volume):
    _, label = volume
    surface = label == 1
    assert 0.03 < surface.mean() < 0.4
    # 2-3 voxels thick: two erosions remove (almost) all of it.
    assert ndimage.binary_erosion(surface, iterations=2).sum() < 0.02 * surface.sum()
    # One membrane per sheet: many separate pieces of real size.
    pieces = cc3d.connected_components(surface.astype(np.uint8), connectivity=26)
    sizes = np.bincount(pieces.ravel())[1:]
    assert (sizes > 200).sum() >= 3


def test_volume_shape_is_configurable():
    image, label = generate_volume((8, 20, 36), np.random.default_rng(0))
    assert image.shape == label.shape == (8, 20, 36)
    with pytest.raises(UserError):
        generate_volume((2, 20, 20), np.random.default_rng(0))


def test_dataset_layout(synth_data: Path):
    made = json.loads((synth_data / MARKER).read_text())  # the arguments it was written with
    assert made["n"] == 6 and made["scrolls"] == 3 and made["n_test"] == 2
    train = list(csv.DictReader(open(synth_data / "train.csv")))
    test = list(csv.DictReader(open(synth_data / "test.csv")))
    assert (synth_data / "train.csv").read_text().splitlines()[0] == "id,scroll_id"
    assert (synth_data / "test.csv").read_text().splitlines()[0] == "id,scroll_id"
    assert len(train) == made["n"] and len(test) == made["n_test"]
    assert len({row["scroll_id"] for row in train}) == made["scrolls"]
    ids = [row["id"] for row in train + test]
    assert len(set(ids)) == len(ids) and all(i.isdigit() for i in ids)
    for row in train:
        for folder in ("train_images", "train_labels"):
            with tifffile.TiffFile(synth_data / folder / f"{row['id']}.tif") as tif:
                assert len(tif.pages) == made["shape"][0]
                assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
                volume = tif.asarray()
            assert volume.shape == tuple(made["shape"]) and volume.dtype == np.uint8
    assert sorted(p.stem for p in (synth_data / "test_images").iterdir()) == sorted(r["id"] for r in test)
    assert not (synth_data / "test_labels").exists()


def test_same_arguments_give_identical_files_and_another_seed_does_not(tmp_path):
    args = {"n": 2, "shape": (8, 16, 16), "scrolls": 2, "n_test": 1, "progress": False}
    first = write_dataset(tmp_path / "a", seed=3, **args)
    second = write_dataset(tmp_path / "b", seed=3, **args)
    third = write_dataset(tmp_path / "c", seed=4, **args)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 + 2 + 1 + 2 + 1  # images, labels, test images, csvs, marker
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "train.csv").read_bytes() != (third / "train.csv").read_bytes()


def test_regenerating_replaces_a_generated_folder_and_refuses_any_other(tmp_path):
    out = write_dataset(tmp_path / "d", n=3, shape=(8, 16, 16), scrolls=1, n_test=1, progress=False)
    assert (out / MARKER).is_file()
    write_dataset(out, n=2, shape=(8, 16, 16), scrolls=1, n_test=1, progress=False)
    assert len(list((out / "train_images").iterdir())) == 2  # no stale volume left behind
    assert check_dataset(out, progress=False).ok
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        write_dataset(foreign, n=1, shape=(8, 16, 16), progress=False)
    assert (foreign / "notes.txt").read_text() == "precious"


def test_cli_synth_output_passes_cli_check(tmp_path):
    out = tmp_path / "demo"
    runner = CliRunner()
    made = runner.invoke(cli, ["data", "synth", "--out", str(out), "--n", "3", "--shape", "8", "24", "24",
                               "--scrolls", "2", "--test", "1", "--seed", "5"])
    assert made.exit_code == 0, made.output
    assert len(list((out / "train_images").glob("*.tif"))) == 3
    checked = runner.invoke(cli, ["data", "check", str(out)])
    assert checked.exit_code == 0, checked.output
    assert "training volumes" in checked.output and "8x24x24 (4)" in checked.output


def test_cli_defaults_match_the_library_defaults():
    from vesuvius_lab.core.data import synthetic

    options = {p.name: p.default for p in cli.commands["data"].commands["synth"].params}
    assert options["n"] == synthetic.DEFAULT_N and options["scrolls"] == synthetic.DEFAULT_SCROLLS
    assert tuple(options["shape"]) == synthetic.DEFAULT_SHAPE and options["n_test"] == synthetic.DEFAULT_TEST


def test_style_families_move_their_looks_outside_the_base_ranges(tmp_path):
    from vesuvius_lab.core.data.synthetic import BASE_RANGES, FAMILIES, ScrollStyle

    for family, ranges in FAMILIES.items():
        for seed in range(5):
            style = ScrollStyle.draw(np.random.default_rng(seed), family)
            for name, (low, high) in {**BASE_RANGES, **ranges}.items():
                assert low <= getattr(style, name) <= high, (family, name)
    assert ScrollStyle.draw(np.random.default_rng(3)) == ScrollStyle.draw(np.random.default_rng(3), "base")
    result = CliRunner().invoke(cli, ["data", "synth", "--out", str(tmp_path / "d"), "--n", "3", "--test", "1",
                                      "--shape", "16", "32", "32", "--scrolls", "3", "--family", "noise",
                                      "--family", "contrast"])
    assert result.exit_code == 0, result.output
    marker = json.loads((tmp_path / "d" / MARKER).read_text())
    assert list(marker["families"].values()) == ["noise", "contrast", "noise"]
    for scroll, family in marker["families"].items():
        low, high = {**BASE_RANGES, **FAMILIES[family]}["noise"]
        assert low <= marker["styles"][scroll]["noise"] <= high
    refused = run_cli(["data", "synth", "--out", str(tmp_path / "e"), "--family", "foggy"])
    assert refused.returncode == 2 and "unknown style family 'foggy'" in refused.stderr
    assert not (tmp_path / "e").exists()  # refused before anything is written
