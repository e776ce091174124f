"""Datasets of hundreds of volumes: synthesised by a pool with the files of one process, each cache entry hashed
once (then trusted by its stamp until it changes), and training that opens a volume only when it samples it.
The figures (start-up, memory, throughput at 8/64/256 volumes) are benchmarks/scale.py's."""

from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import pytest

from vesuvius_lab.core.config.spec import Augment
from vesuvius_lab.core.data import array_cache, synthetic
from vesuvius_lab.core.data.array_cache import checksum_path, entry_problem, read_array
from vesuvius_lab.core.data.dataset import Dataset, open_volume
from vesuvius_lab.core.data.sampling import CachedVolumeSource, PatchStream
from vesuvius_lab.core.data.split import TrainingSplit, check_volumes


def test_a_pool_of_writers_writes_the_files_of_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "POOL_VOXELS", 0)  # a pool even for volumes this small
    one = synthetic.write_dataset(tmp_path / "one", n=3, shape=(8, 24, 24), n_test=1, progress=False, workers=1)
    two = synthetic.write_dataset(tmp_path / "two", n=3, shape=(8, 24, 24), n_test=1, progress=False, workers=2)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 3 + 3 + 1 + 3  # images, labels, test image, two csv files and the marker
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.fixture
def counted_hashes(monkeypatch) -> list:
    """Every data hash the cache computes from now on, in a process that has verified nothing yet."""
    monkeypatch.setattr(array_cache, "_verified", {})
    calls: list = []
    real = array_cache.data_digest
    monkeypatch.setattr(array_cache, "data_digest", lambda array: calls.append(array.shape) or real(array))
    return calls


def _age(entry, seconds: float = 60) -> None:
    """Make an entry look written ``seconds`` ago (older than the racy window)."""
    past = time.time() - seconds
    os.utime(entry, (past, past))


def test_the_writer_stamps_an_entry_and_readers_trust_it_until_it_changes(tmp_path, counted_hashes, monkeypatch):
    entry, data = tmp_path / "v.npy", np.arange(4096, dtype=np.uint8).reshape(16, 16, 16)
    array_cache.write_array(entry, data)
    counted_hashes.clear()  # the writer's own hash
    assert json.loads(checksum_path(entry).read_text())["verified"][1] == entry.stat().st_size
    assert read_array(entry) is not None and not counted_hashes  # another process trusts the stamp
    assert entry_problem(entry, full=True) is None and len(counted_hashes) == 1  # vlab data check hashes anyway

    np.save(entry, 255 - data)  # same size, in place, at once: within the timestamp tick of the stamp
    monkeypatch.setattr(array_cache, "_verified", {})
    assert read_array(entry) is None and not entry.exists()  # its mtime moved: hashed, refused, deleted


def test_a_reader_stamps_an_entry_it_hashed_unless_it_was_just_modified(tmp_path, counted_hashes, monkeypatch):
    entry = tmp_path / "v.npy"
    array_cache.write_array(entry, np.arange(4096, dtype=np.uint8).reshape(16, 16, 16))
    record = json.loads(checksum_path(entry).read_text())
    del record["verified"]  # an entry of an older cache, or whose writer could not stamp it
    checksum_path(entry).write_text(json.dumps(record))
    os.utime(entry)  # and modified just now: racy, so the reader that hashes it does not stamp it
    counted_hashes.clear()
    assert read_array(entry) is not None and len(counted_hashes) == 1
    assert "verified" not in json.loads(checksum_path(entry).read_text())
    _age(entry)
    monkeypatch.setattr(array_cache, "_verified", {})
    assert read_array(entry) is not None and len(counted_hashes) == 2  # hashed, and now stamped
    monkeypatch.setattr(array_cache, "_verified", {})
    assert read_array(entry) is not None and len(counted_hashes) == 2


def test_a_stream_of_many_volumes_opens_only_those_it_samples(synth_data, tmp_path):
    dataset = Dataset.open(synth_data)
    cache = tmp_path / "cache"
    sources = [CachedVolumeSource(dataset.image_path(i), dataset.label_path(i), cache) for i in dataset.ids]
    stream = PatchStream(sources, (8, 16, 16), foreground_share=1.0, switches=Augment(), seed=0)
    assert not cache.exists()  # building the stream read nothing
    for _, (image, targets) in zip(range(2), stream):
        assert image.shape == (1, 8, 16, 16) and targets.shape == (1, 8, 16, 16)
    opened = [s for s in stream.sources if "image" in s.__dict__]
    assert 1 <= len(opened) <= 2 < len(sources)
    assert len(list(cache.glob("*.npy"))) == 3 * len(opened)  # image, label, surface points of each
    assert len(pickle.dumps(opened[0])) < 1000  # a spawned worker gets the paths, not the arrays


def test_start_up_reads_no_voxel_of_a_volume_the_cache_holds(synth_data, tmp_path, counted_hashes, monkeypatch):
    dataset = Dataset.open(synth_data)
    split = TrainingSplit(dataset, dataset.ids[:4], dataset.ids[4:], [dataset.ids[4:]], None)
    cache = tmp_path / "cache"
    check_volumes(split, (8, 16, 16), cache)  # the first run decodes every volume and counts its labels
    assert len(list(cache.glob("*.npy"))) == 3 * len(dataset.ids)  # image, label, label counts

    def read_a_voxel(*_):
        raise AssertionError("a cached volume was read")

    monkeypatch.setattr(array_cache, "_verified", {})  # the next run, in a process of its own
    monkeypatch.setattr(array_cache, "data_digest", read_a_voxel)
    monkeypatch.setattr(np, "bincount", read_a_voxel)  # the label counts come from their cache entries
    check_volumes(split, (8, 16, 16), cache)  # stats and small reads only


def test_label_values_outside_0_1_2_are_still_refused_before_a_run(tmp_path):
    from vesuvius_lab.core.data.tiff import write_volume
    from vesuvius_lab.core.errors import UserError

    root = synthetic.write_dataset(tmp_path / "data", n=2, shape=(8, 24, 24), n_test=1, progress=False)
    dataset = Dataset.open(root)
    label = np.array(open_volume(dataset.label_path(dataset.ids[0]), tmp_path / "cache"))
    label[0, 0, 0] = 7
    write_volume(dataset.label_path(dataset.ids[0]), label)
    split = TrainingSplit(dataset, dataset.ids, [], [dataset.ids], None)
    with pytest.raises(UserError, match=r"label values outside \{0, 1, 2\} \(found 7\)"):
        check_volumes(split, (8, 16, 16), tmp_path / "cache")
