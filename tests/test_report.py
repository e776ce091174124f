"""`vlab report` pictures and index.html on a real tiny run, the error overlay, and `vlab compare`."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_experiment

from vesuvius_lab.cli import main
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.reports.pictures import (ALPHA, BACKGROUND, COLOURS, EXTRA, FOUND, IGNORED, LABELLED, MISSED,
                                                error_classes, overlay_rgb, slice_classes, training_curves,
                                                volume_figure)
from vesuvius_lab.core.reports.run_report import pick_volumes, write_report
from vesuvius_lab.core.runs.folder import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = tiny_experiment("pictured", epochs=2)


@pytest.fixture(scope="module")
def trained_run(synth_data, tmp_path_factory) -> Run:
    """One real run of a tiny 2.5D UNet on a copy of the synthetic data (two validation volumes)."""
    from vesuvius_lab.core.config.experiment import load_experiment
    from vesuvius_lab.core.config.project import Project
    from vesuvius_lab.core.config.spec import ProjectSettings
    from vesuvius_lab.core.training.trainer import train

    root = tmp_path_factory.mktemp("report")
    data = shutil.copytree(synth_data, root / "data")
    (root / "exp.toml").write_text(textwrap.dedent(TINY))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLAB_DATA", "")  # empty = unset
        patch.setenv("VLAB_RUNS", "")
        project = Project(root, None, ProjectSettings(data_root=data, runs_dir=root / "runs", device="cpu", workers=0))
        return train(load_experiment(root / "exp.toml"), project)


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)[..., :3]


def pixels_near(image: np.ndarray, colour: tuple[float, float, float], tolerance: float = 0.06) -> int:
    return int((np.abs(image - np.asarray(colour)).max(axis=-1) < tolerance).sum())


@pytest.mark.slow
def test_vlab_report_writes_pictures_and_an_index(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLAB_RUNS", "")  # --runs writes it; undone after the test
    runs_dir = trained_run.path.parent.parent
    out = tmp_path / "report"
    main(["--runs", str(runs_dir), "report", f"{trained_run.experiment}/{trained_run.id}", "-o", str(out)])
    assert "wrote 2 volume picture(s)" in capsys.readouterr().out
    scored = json.loads((trained_run.path / "scores.json").read_text())["volumes"]
    pictures = sorted(out.glob("volume-*.png"))
    assert sorted(p.name for p in pictures) == sorted(f"volume-{v['id']}.png" for v in scored)
    for path in [*pictures, out / "training.png"]:
        image = read_png(path)
        assert image.shape[0] >= 500 and image.shape[1] >= 900
        assert image.std() > 0.05  # not a blank canvas
    # The label panel always shows labelled surface: the slices are chosen where it is.
    assert pixels_near(read_png(pictures[0]), ALPHA[LABELLED] * np.asarray(COLOURS[LABELLED]), 0.5) > 0
    index = (out / "index.html").read_text()
    assert all(f"src='{p.name}'" in index for p in pictures) and 'src="training.png"' in index
    summary = json.loads((trained_run.path / "summary.json").read_text())
    assert f"{summary['score']:.4f}" in index


def test_error_classes_follow_the_metric_tolerance():
    label = np.zeros((20, 20, 20), np.uint8)
    label[10] = 1  # a labelled sheet at z = 10
    label[:, :, 15:] = 2  # ignored
    mask = np.zeros_like(label)
    mask[11, :10] = 1  # one voxel off the sheet, for y < 10: found
    mask[3, :, :15] = 1  # seven voxels off: extra
    classes = error_classes(label, mask)
    assert classes[10, 5, 5] == FOUND and classes[11, 5, 5] == FOUND
    assert classes[10, 15, 5] == MISSED  # no prediction within 2 voxels for y >= 10
    assert classes[3, 5, 5] == EXTRA
    assert classes[10, 5, 17] == IGNORED and classes[3, 5, 17] == IGNORED
    assert classes[0, 0, 0] == BACKGROUND
    for axis, index in ((0, 10), (0, 3), (1, 12), (2, 4)):
        assert np.array_equal(slice_classes(label, mask, axis, index), np.take(classes, index, axis=axis))
    rgb = overlay_rgb(np.zeros((20, 20), np.uint8), classes[10], contrast=(0, 255))
    assert np.allclose(rgb[15, 5], ALPHA[MISSED] * np.asarray(COLOURS[MISSED]))
    assert np.allclose(rgb[5, 5], ALPHA[FOUND] * np.asarray(COLOURS[FOUND]))
    rgb = overlay_rgb(np.zeros((20, 20), np.uint8), classes[0], contrast=(0, 255))
    assert np.allclose(rgb[5, 5], 0)  # background: the CT itself (black here)
    assert np.allclose(rgb[5, 17], ALPHA[IGNORED] * np.asarray(COLOURS[IGNORED]))


def test_the_error_colours_appear_where_the_errors_are(synth_data, tmp_path):
    from vesuvius_lab.core.data.tiff import read_volume

    volume_id = sorted(p.stem for p in (synth_data / "train_labels").glob("*.tif"))[0]
    image = read_volume(synth_data / "train_images" / f"{volume_id}.tif")
    label = read_volume(synth_data / "train_labels" / f"{volume_id}.tif")
    truth = (label == 1).astype(np.float32)
    wrong = np.roll(truth, 4, axis=2)  # every sheet moved four voxels: missed on one side, extra on the other
    perfect = volume_figure(tmp_path / "perfect.png", image, label, truth, truth.astype(np.uint8), title="perfect")
    shifted = volume_figure(tmp_path / "shifted.png", image, label, wrong, wrong.astype(np.uint8), title="shifted")
    for cls in (MISSED, EXTRA):
        colour = ALPHA[cls] * np.asarray(COLOURS[cls]) + (1 - ALPHA[cls]) * 0.5  # over mid-grey CT, roughly
        in_perfect = pixels_near(read_png(perfect), colour, 0.12)  # the legend's patch only
        in_shifted = pixels_near(read_png(shifted), colour, 0.12)
        assert in_shifted > in_perfect + 1000, (cls, in_perfect, in_shifted)


def test_training_curves_tolerate_gaps():
    metrics = [{"epoch": 1, "loss": 0.9, "loss_terms": {"dice": 0.8}, "lr": 1e-3},
               {"epoch": 2, "loss": 0.7, "lr": 5e-4, "val": {"score": 0.4, "steps": {"threshold": 0.4}}},
               {"epoch": 3}]
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = training_curves(Path(folder) / "t.png", metrics, title="gaps", best_epoch=2)
        assert read_png(path).shape[1] >= 900
        assert read_png(training_curves(Path(folder) / "e.png", [], title="empty")).std() > 0


def test_pick_volumes_spreads_from_worst_to_best():
    volumes = [{"id": str(i), "score": s} for i, s in enumerate((0.5, 0.1, 0.9, 0.3, 0.7))]
    assert [v["score"] for v in pick_volumes(volumes, 3)] == [0.1, 0.5, 0.9]
    assert [v["score"] for v in pick_volumes(volumes, 10)] == [0.1, 0.3, 0.5, 0.7, 0.9]


def record_run(path: Path, *, lr: float, encoder: str, scores: dict[str, float]) -> Path:
    path.mkdir(parents=True)
    spec = Experiment.model_validate({"name": path.parent.name, "data": {"root": "/d", "folds": 3},
                                      "model": {"plugin": "smp_unet25d", "params": {"encoder": encoder}},
                                      "train": {"lr": lr}}).model_dump(mode="json")
    (path / "spec.json").write_text(json.dumps(spec))
    (path / "status.json").write_text(json.dumps({"state": "finished"}))
    volumes = [{"id": k, "score": v, "topo_score": v, "surface_dice": v, "voi_score": v} for k, v in scores.items()]
    (path / "scores.json").write_text(json.dumps({"volumes": volumes}))
    mean = sum(scores.values()) / len(scores)
    (path / "summary.json").write_text(json.dumps({"score": mean, "steps": {"threshold": mean}}))
    return path


def test_vlab_compare_shows_changed_keys_and_volume_differences(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLAB_RUNS", "")  # --runs writes it; undone after the test
    a = record_run(tmp_path / "runs" / "base" / "fold0-1", lr=1e-3, encoder="resnet18", scores={"v1": 0.5, "v2": 0.6})
    record_run(tmp_path / "runs" / "bigger" / "fold0-2", lr=3e-4, encoder="resnet34", scores={"v1": 0.7, "v3": 0.2})
    main(["--runs", str(tmp_path / "runs"), "compare", str(a), "bigger/fold0-2"])
    text = capsys.readouterr().out
    assert "Settings: 3 key(s) differ" in text  # name, model.params.encoder, train.lr
    for expected in ("model.params.encoder", "resnet18", "resnet34", "train.lr", "0.0010", "0.0003"):
        assert expected in text
    v1 = next(line for line in text.splitlines() if line.split()[:1] == ["v1"])
    assert "+0.2000" in v1
    assert "v2" in text and "v3" in text


def test_report_of_a_run_without_scores_still_writes_its_index(tmp_path):
    run = tmp_path / "runs" / "x" / "fold0-1"
    run.mkdir(parents=True)
    (run / "spec.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "lo')
    files = write_report(Run(run), tmp_path / "out")
    assert files.volumes == {} and "no scores.json yet" in files.index.read_text()
    assert read_png(files.curves).shape[1] >= 900
