"""The dataset index, folds, the memory-mapped volume cache and `vlab data check`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from vesuvius_lab.cli import cli
from vesuvius_lab.core.data.array_cache import checksum_path, entry_problem
from vesuvius_lab.core.data.dataset import Dataset, Derived, check_dataset, make_folds, open_volume
from vesuvius_lab.core.data.tiff import VolumeError, write_volume
from vesuvius_lab.core.errors import UserError

VLAB = str(Path(sys.executable).parent / "vlab")


@pytest.fixture
def data(tmp_path, synth_data) -> Path:
    """A private copy of the session's synthetic dataset, free to damage."""
    return Path(shutil.copytree(synth_data, tmp_path / "data"))


def _train_ids(root: Path) -> list[str]:
    return [line.split(",")[0] for line in (root / "train.csv").read_text().splitlines()[1:]]


# --------------------------------------------------------------------------- the index


def test_dataset_lists_ids_scrolls_and_paths(synth_data):
    dataset = Dataset.open(synth_data)
    assert len(dataset.ids) == 6 and len(dataset.test_ids) == 2
    assert len({dataset.scroll_of(i) for i in dataset.ids}) == 3
    assert dataset.scroll_of(dataset.test_ids[0]) in set(dataset.train.values())
    for volume_id in dataset.ids:
        assert dataset.image_path(volume_id).is_file() and dataset.label_path(volume_id).is_file()
    assert dataset.image_path(dataset.test_ids[0], "test").parent.name == "test_images"
    with pytest.raises(UserError, match="neither"):
        dataset.scroll_of("nope")


def test_dataset_open_reports_a_missing_folder_and_a_bad_csv(tmp_path, data):
    with pytest.raises(UserError, match="data folder not found"):
        Dataset.open(tmp_path / "absent")
    (data / "train.csv").write_text("volume,scroll\n1,2\n")
    with pytest.raises(UserError, match=r"train\.csv: line 1 must be a header"):
        Dataset.open(data)


# --------------------------------------------------------------------------- folds


def _assert_partition(folds, ids):
    every = [i for fold in folds.validation for i in fold]
    assert sorted(every) == sorted(ids)  # each id in exactly one validation fold
    assert all(folds.validation)  # no empty fold


def test_folds_never_put_a_scroll_in_training_and_validation(synth_data):
    dataset = Dataset.open(synth_data)
    folds = dataset.folds(3)
    assert folds.group_by == "scroll_id" and folds.note is None
    _assert_partition(folds, dataset.ids)
    for fold in range(3):
        train, val = folds.split(fold)
        assert not {dataset.scroll_of(i) for i in train} & {dataset.scroll_of(i) for i in val}
        assert sorted(train + val) == sorted(dataset.ids)
    assert dataset.folds(3) == folds  # deterministic


def test_folds_balance_uneven_scrolls_and_depend_only_on_the_seed():
    ids = [f"v{i}" for i in range(11)]
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"]
    for seed in range(4):
        folds = make_folds(ids, groups, 2, seed=seed)
        _assert_partition(folds, ids)
        scroll_folds = {g: {folds.fold_of(i) for i, gi in zip(ids, groups) if gi == g} for g in set(groups)}
        assert all(len(f) == 1 for f in scroll_folds.values())
        assert sorted(len(f) for f in folds.validation) == [5, 6]
        assert make_folds(ids, groups, 2, seed=seed) == folds


def test_fewer_scrolls_than_folds_fall_back_to_volume_ids_and_say_so(synth_data):
    dataset = Dataset.open(synth_data)
    folds = dataset.folds(5)
    assert folds.group_by == "id"
    assert "3 scroll(s) for 5 folds" in folds.note
    assert len(folds) == 5
    _assert_partition(folds, dataset.ids)
    assert dataset.folds(5, group_by="id").note is None


def test_impossible_folds_are_user_errors(synth_data):
    dataset = Dataset.open(synth_data)
    with pytest.raises(UserError, match="at least 7 training volumes"):
        dataset.folds(7)
    with pytest.raises(UserError, match="Fold 3 does not exist"):
        dataset.folds(3).split(3)


# --------------------------------------------------------------------------- the cache


def test_cache_hits_on_the_second_open(tmp_path, synth_data):
    path = Dataset.open(synth_data).image_path(_train_ids(synth_data)[0])
    cache = tmp_path / "cache"
    first = open_volume(path, cache)
    assert isinstance(first, np.memmap) and first.dtype == np.uint8
    assert np.array_equal(first, tifffile.imread(path))
    (entry,) = cache.glob("*.npy")
    assert checksum_path(entry).is_file()
    written = entry.stat().st_mtime_ns
    second = open_volume(path, cache)
    assert Path(second.filename) == entry and entry.stat().st_mtime_ns == written  # read, not decoded again
    assert list(cache.glob("*.npy")) == [entry]
    with pytest.raises(ValueError):
        second[0, 0, 0] = 1  # read-only


@pytest.mark.parametrize("damage", ["same size, other content", "another shape", "truncated", "no checksum"])
def test_a_damaged_cache_entry_is_rebuilt_never_used(damage, tmp_path, synth_data):
    """The cache cannot lie: an entry that does not match its checksum is decoded again from the TIFF."""
    path = Dataset.open(synth_data).image_path(_train_ids(synth_data)[0])
    cache = tmp_path / "cache"
    truth = np.array(open_volume(path, cache))
    (entry,) = cache.glob("*.npy")
    if damage == "same size, other content":
        np.save(entry, 255 - truth)
    elif damage == "another shape":
        np.save(entry, np.zeros((2, 2, truth.size // 4), np.uint8))
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    else:
        checksum_path(entry).unlink()
    assert np.array_equal(open_volume(path, cache), truth)
    assert entry_problem(entry) is None


def test_data_check_finds_and_deletes_damaged_cache_entries(tmp_path, synth_data):
    path = Dataset.open(synth_data).image_path(_train_ids(synth_data)[0])
    cache = tmp_path / "cache"
    truth = np.array(open_volume(path, cache))
    (entry,) = cache.glob("*.npy")
    np.save(entry, 255 - truth)
    report = check_dataset(synth_data, progress=False, cache_dir=cache)
    assert report.ok
    (note,) = report.notes
    assert str(entry) in note and "does not match its checksum" in note
    assert not entry.exists()


def test_cache_is_invalidated_when_the_file_changes(tmp_path):
    path, cache = tmp_path / "v.tif", tmp_path / "cache"
    write_volume(path, np.zeros((4, 8, 8), np.uint8))
    assert int(open_volume(path, cache).max()) == 0
    write_volume(path, np.full((4, 8, 8), 7, np.uint8))
    assert int(open_volume(path, cache).max()) == 7
    assert len(list(cache.glob("*.npy"))) == 1  # the stale entry is gone
    assert not list(cache.glob("*.tmp"))


TOTALS = Derived("totals1", lambda volume: volume.sum(axis=0, dtype=np.uint32), "column sums")


def test_a_derived_volume_is_cached_beside_its_source_and_rebuilt_when_the_source_changes(tmp_path):
    path, cache = tmp_path / "v.tif", tmp_path / "cache"
    write_volume(path, np.ones((4, 8, 8), np.uint8))
    totals = open_volume(path, cache, TOTALS)
    assert isinstance(totals, np.memmap) and totals.shape == (8, 8) and int(totals.max()) == 4
    entries = sorted(cache.glob("*.npy"))
    assert len(entries) == 2 and any("totals1" in entry.name for entry in entries)  # the decoded volume and its sums
    (derived,) = [entry for entry in entries if "totals1" in entry.name]
    written = derived.stat().st_mtime_ns
    assert int(open_volume(path, cache, TOTALS).max()) == 4 and derived.stat().st_mtime_ns == written
    write_volume(path, np.full((4, 8, 8), 3, np.uint8))
    assert int(open_volume(path, cache, TOTALS).max()) == 12
    assert int(open_volume(path, cache).max()) == 3
    assert len(list(cache.glob("*.npy"))) == 2 and not derived.exists()  # each kind's stale entry went


def test_data_check_verifies_derived_entries_too(tmp_path, synth_data):
    path = Dataset.open(synth_data).label_path(_train_ids(synth_data)[0])
    cache = tmp_path / "cache"
    truth = np.array(open_volume(path, cache, TOTALS))
    (derived,) = cache.glob("*totals1*.npy")
    np.save(derived, truth + 1)
    (note,) = check_dataset(synth_data, progress=False, cache_dir=cache).notes
    assert str(derived) in note and not derived.exists()
    np.testing.assert_array_equal(open_volume(path, cache, TOTALS), truth)  # rebuilt on the next open


def _open_and_sum(args) -> int:
    path, cache = args
    return int(open_volume(Path(path), Path(cache)).sum(dtype=np.int64))


def test_concurrent_processes_share_one_complete_entry(tmp_path, synth_data):
    path = Dataset.open(synth_data).image_path(_train_ids(synth_data)[1])
    cache = tmp_path / "cache"
    with ProcessPoolExecutor(2) as pool:
        sums = list(pool.map(_open_and_sum, [(str(path), str(cache))] * 4))
    assert sums == [int(tifffile.imread(path).sum(dtype=np.int64))] * 4
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob(".*"))


def test_cache_refuses_a_truncated_volume(tmp_path, data):
    path = Dataset.open(data).image_path(_train_ids(data)[0])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VolumeError, match="the file is truncated or damaged"):
        open_volume(path, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy"))


# --------------------------------------------------------------------------- the check


def test_clean_dataset_passes_with_a_summary(synth_data):
    report = check_dataset(synth_data, progress=False)
    assert report.ok, report.problems
    summary = report.summary
    assert (summary.train, summary.test, len(summary.scrolls)) == (6, 2, 3)
    assert dict(summary.shapes) == {(32, 48, 48): 8}
    assert sum(summary.label_fractions) == pytest.approx(1.0)
    assert all(f > 0 for f in summary.label_fractions)


def test_check_names_a_truncated_tiff_and_a_missing_label_without_traceback(data):
    first, second = _train_ids(data)[:2]
    image = data / "train_images" / f"{first}.tif"
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 2 // 3])
    (data / "train_labels" / f"{second}.tif").unlink()
    result = subprocess.run([VLAB, "data", "check", str(data)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 2, result.stderr
    assert any(f"{first}.tif: the file is truncated or damaged" in line for line in lines)
    assert any(f"train_labels/{second}.tif: missing" in line for line in lines)


def _first(root: Path, folder: str = "train_labels") -> Path:
    return root / folder / f"{_train_ids(root)[0]}.tif"


def _write_raw(path: Path, array: np.ndarray) -> None:
    tifffile.imwrite(path, array, compression="lzw", photometric="minisblack")


def _damage_2d(root):
    _write_raw(_first(root, "train_images"), np.zeros((48, 48), np.uint8))
    return "expected a 3D volume", "train_images"


def _damage_dtype(root):
    _write_raw(_first(root), np.zeros((32, 48, 48), np.uint16))
    return "expected uint8 voxels, found uint16", "train_labels"


def _damage_shape(root):
    _write_raw(_first(root), np.zeros((32, 48, 40), np.uint8))
    return "differs from its image's (32, 48, 48)", "train_labels"


def _damage_values(root):
    label = tifffile.imread(_first(root))
    label[5, 5, 5], label[6, 6, 6] = 3, 7
    _write_raw(_first(root), label)
    return "label values 3, 7 found", "train_labels"


def _damage_csv_id_without_file(root):
    with open(root / "train.csv", "a") as handle:
        handle.write("123456789,42\n")
    return "missing, but train.csv lists id 123456789", "123456789.tif"


def _damage_file_without_id(root):
    shutil.copy(_first(root, "train_images"), root / "train_images" / "999.tif")
    return "no row of train.csv has the id 999", "train_images/999.tif"


def _damage_empty_test_folder(root):
    for path in (root / "test_images").iterdir():
        path.unlink()
    (root / "test.csv").write_text("id,scroll_id\n")
    return "no .tif volumes", "test_images"


def _damage_malformed_csv(root):
    (root / "test.csv").write_text("id,scroll_id\n" + _train_ids(root)[0][:3] + ",1,extra\n")
    return "line 2 has 3 fields", "test.csv"


@pytest.mark.parametrize("damage", [_damage_2d, _damage_dtype, _damage_shape, _damage_values,
                                    _damage_csv_id_without_file, _damage_file_without_id,
                                    _damage_empty_test_folder, _damage_malformed_csv])
def test_check_reports_each_failure_class(data, damage):
    phrase, where = damage(data)
    problems = check_dataset(data, progress=False).problems
    matching = [p for p in problems if phrase in p]
    assert matching, problems
    assert all(where in p for p in matching)


def test_check_reports_missing_csv_files_and_folders(data):
    (data / "train.csv").unlink()
    shutil.rmtree(data / "test_images")
    problems = check_dataset(data, progress=False).problems
    assert any("train.csv: missing" in p for p in problems)
    assert any("test_images: folder missing" in p for p in problems)
    # Without train.csv every volume lacks an id: each is named.
    assert sum("no row of train.csv" in p for p in problems) == 12


def test_check_defaults_to_the_project_data_root(synth_data, data, monkeypatch):
    monkeypatch.setenv("VLAB_DATA", "")  # --data writes VLAB_DATA; restore it afterwards
    runner = CliRunner()
    assert runner.invoke(cli, ["--data", str(synth_data), "data", "check"]).exit_code == 0
    (data / "test.csv").unlink()
    result = runner.invoke(cli, ["--data", str(data), "data", "check"])
    assert result.exit_code == 2 and "test.csv: missing" in result.output


def test_check_reports_every_problem_of_one_file(data):
    _write_raw(_first(data), np.zeros((32, 40, 48), np.float32))
    problems = [p for p in check_dataset(data, progress=False).problems if _first(data).name in p]
    assert len(problems) == 2
    assert "found float32" in problems[0] and "differs from its image's" in problems[1]
