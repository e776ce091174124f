"""``vlab evaluate`` and the module under it: pairing by id, problems reported together, workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import conformance_arrays, conformance_expected

from vesuvius_lab.core.data.tiff import write_volume
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.metric.evaluate import evaluate_pairs, pair_volumes
from vesuvius_lab.core.metric.score import score_volume

IDS = ("case101_03_merge", "case101_06_noise", "hand_odd_shape")


def vlab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # a wide table: one line per volume
    return subprocess.run([sys.executable, "-m", "vesuvius_lab", "evaluate", *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, dict]:
    """pred/ and label/ folders with three conformance cases, and their arrays."""
    root = tmp_path_factory.mktemp("evaluate")
    arrays = {}
    data = conformance_arrays("metric")
    for volume_id in IDS:
        arrays[volume_id] = data[f"{volume_id}__pred"], data[f"{volume_id}__label"]
        write_volume(root / "pred" / f"{volume_id}.tif", arrays[volume_id][0])
        write_volume(root / "label" / f"{volume_id}.tif", arrays[volume_id][1])
    return root / "pred", root / "label", arrays


def test_json_scores_equal_score_volume(folders):
    pred, label, arrays = folders
    result = vlab(str(pred), str(label), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [v["id"] for v in report["volumes"]] == sorted(IDS)
    expected = conformance_expected("metric")
    for volume in report["volumes"]:
        direct = score_volume(*arrays[volume["id"]]).to_dict()
        assert volume == {"id": volume["id"], **direct}
        assert volume["score"] == pytest.approx(expected[volume["id"]]["score"], abs=1e-3)
    assert report["mean"]["n_volumes"] == 3
    assert report["mean"]["score"] == pytest.approx(np.mean([v["score"] for v in report["volumes"]]))


def test_table_and_two_files(folders):
    pred, label, _ = folders
    result = vlab(str(pred / "hand_odd_shape.tif"), str(label / "hand_odd_shape.tif"))
    assert result.returncode == 0, result.stderr
    assert "hand_odd_shape" in result.stdout and "0.7203" in result.stdout and "4/15/4" in result.stdout
    assert "mean of 1" in result.stdout


def test_workers_give_the_same_scores(folders):
    pred, label, _ = folders
    pairs = pair_volumes(pred, label)
    seen = []
    serial = evaluate_pairs(pairs, workers=1)
    parallel = evaluate_pairs(pairs, workers=2, on_volume=seen.append)
    assert parallel == serial and not serial.problems
    assert sorted(seen) == sorted(IDS)


def test_all_problems_are_reported_together(folders, tmp_path):
    pred_src, label_src, arrays = folders
    pred, label = tmp_path / "pred", tmp_path / "label"
    pred.mkdir(), label.mkdir()
    good = "case101_03_merge"
    for folder, source in ((pred, pred_src), (label, label_src)):
        (folder / f"{good}.tif").write_bytes((source / f"{good}.tif").read_bytes())
    (pred / "only_pred.tif").write_bytes((pred_src / f"{good}.tif").read_bytes())
    (label / "only_label.tif").write_bytes((label_src / f"{good}.tif").read_bytes())
    write_volume(pred / "small.tif", arrays["hand_odd_shape"][0])  # 37x29x41 against 64^3
    write_volume(label / "small.tif", arrays[good][1])
    (pred / "junk.tif").write_text("not a TIFF")
    write_volume(label / "junk.tif", arrays[good][1])
    whole = (pred_src / f"{good}.tif").read_bytes()
    (pred / "cut.tif").write_bytes(whole[: len(whole) // 3])
    write_volume(label / "cut.tif", arrays[good][1])

    result = vlab(str(pred), str(label))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    messages = result.stderr.replace("\n", " ")
    for fragment in ("only_pred.tif: no label", "only_label.tif: no prediction", "small.tif: shape (37, 29, 41)",
                     "junk.tif: cannot read", "cut.tif: the file is truncated"):
        assert fragment in messages
    assert "5 problem(s)" in messages


def test_mixed_or_missing_arguments_are_user_errors(folders, tmp_path):
    pred, label, _ = folders
    with pytest.raises(UserError, match="not one of each"):
        pair_volumes(pred, label / "hand_odd_shape.tif")
    with pytest.raises(UserError, match="no such file"):
        pair_volumes(tmp_path / "missing", label)
    (tmp_path / "empty_a").mkdir(), (tmp_path / "empty_b").mkdir()
    with pytest.raises(UserError, match="no .tif files"):
        pair_volumes(tmp_path / "empty_a", tmp_path / "empty_b")


def test_a_file_that_fails_while_scoring_is_reported_with_the_others_scored(folders, tmp_path):
    pred_src, label_src, _ = folders
    pred, label = tmp_path / "pred", tmp_path / "label"
    for folder, source in ((pred, pred_src), (label, label_src)):
        folder.mkdir()
        for volume_id in IDS[:2]:
            (folder / f"{volume_id}.tif").write_bytes((source / f"{volume_id}.tif").read_bytes())
    pairs = pair_volumes(pred, label)
    (pred / f"{IDS[0]}.tif").unlink()  # gone between the check and the scoring
    result = evaluate_pairs(pairs)
    assert [volume_id for volume_id, _ in result.scores] == [IDS[1]]
    assert len(result.problems) == 1 and f"{IDS[0]}.tif" in result.problems[0]
