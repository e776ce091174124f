"""`vlab predict` and `vlab submit` on a trained run, and their answers to bad input."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli

from vesuvius_lab.core.data.tiff import read_tiff, read_volume, write_volume


def vlab(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli(args, cwd)


def test_predict_writes_masks_and_probabilities_of_each_input_shape(tiny_run, synth_data, tmp_path):
    out = tmp_path / "pred"
    result = vlab(["predict", str(tiny_run), "--input", str(synth_data / "test_images"), "--output", str(out),
                   "--probabilities"])
    assert result.returncode == 0, result.stderr
    for image_path in sorted((synth_data / "test_images").glob("*.tif")):
        mask = read_volume(out / image_path.name)
        assert mask.shape == read_volume(image_path).shape and set(np.unique(mask)) <= {0, 1}
        probabilities = read_tiff(out / "probabilities" / f"{image_path.stem}.tif")
        assert probabilities.dtype == np.float16 and probabilities.shape == mask.shape
        assert 0 <= probabilities.min() and probabilities.max() <= 1
        # The mask is the run's chain applied to those probabilities (here: the threshold alone),
        # except where float16 rounding lands on the other side of the threshold.
        decided = np.abs(probabilities.astype(np.float32) - 0.5) > 1e-3
        assert decided.mean() > 0.5
        assert np.array_equal(mask[decided], (probabilities[decided] > 0.5).astype(np.uint8))


def test_predict_output_is_a_valid_input_of_evaluate_and_postprocess(tiny_run, synth_data, tmp_path):
    """Outputs of one command are inputs of the next: the masks folder for `vlab evaluate`, the
    probabilities folder for `vlab postprocess`."""
    out, labels = tmp_path / "pred", synth_data / "train_labels"
    assert vlab(["predict", str(tiny_run), "--input", str(synth_data / "train_images"), "--output", str(out),
                 "--probabilities"]).returncode == 0
    scored = vlab(["evaluate", str(out), str(labels), "--json"])
    assert scored.returncode == 0, scored.stderr
    assert len(json.loads(scored.stdout)["volumes"]) == len(list(labels.glob("*.tif")))
    experiment = tmp_path / "threshold.toml"
    experiment.write_text('name = "t"\n[model]\nplugin = "smp_unet25d"\n[[postprocess]]\nplugin = "threshold"\n'
                          'params = { value = 0.5 }\n')
    processed = vlab(["postprocess", str(experiment), "--input", str(out / "probabilities"),
                      "--output", str(tmp_path / "pp")])
    assert processed.returncode == 0, processed.stderr
    assert sorted(p.name for p in (tmp_path / "pp").glob("*.tif")) == sorted(p.name for p in out.glob("*.tif"))


def test_submit_writes_the_competition_zip(tiny_run, synth_data, tmp_path):
    zip_path = tmp_path / "submission.zip"
    result = vlab(["submit", str(tiny_run), "--input", str(synth_data / "test_images"), "--output", str(zip_path)])
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(p.name for p in (synth_data / "test_images").glob("*.tif"))
        for name in names:
            mask = tifffile.imread(io.BytesIO(archive.read(name)))
            assert mask.dtype == np.uint8 and mask.shape == read_volume(synth_data / "test_images" / name).shape


def test_tta_override_at_prediction_time(tiny_run, synth_data, tmp_path, vlab_here):
    result = vlab_here(["predict", str(tiny_run), "--input", str(next((synth_data / "test_images").glob("*.tif"))),
                   "--output", str(tmp_path / "tta"), "--set", "inference.tta=['flip0', 'flip2']"])
    assert result.returncode == 0, result.stderr
    bad = vlab_here(["predict", str(tiny_run), "--input", str(synth_data / "test_images"), "--output",
                str(tmp_path / "x"), "--set", "train.epochs=3"])
    assert bad.returncode == 2 and "only [inference] keys" in bad.stderr


@pytest.mark.parametrize("case", ["missing run", "2D volume", "smaller than every window", "not a folder"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tiny_run, tmp_path, vlab_here):
    run, source = tiny_run, tmp_path / "in"
    source.mkdir()
    if case == "missing run":
        run = tmp_path / "no-such-run"
        write_volume(source / "a.tif", np.zeros((8, 32, 32), np.uint8))
        expected = "not a run directory"
    elif case == "2D volume":
        tifffile.imwrite(source / "a.tif", np.zeros((32, 32), np.uint8))
        expected = "expected a 3D volume"
    elif case == "smaller than every window":
        write_volume(source / "a.tif", np.zeros((4, 16, 16), np.uint8))
        expected = "smaller than the window"
    else:
        source = tmp_path / "nowhere"
        expected = "no such file or folder"
    out = tmp_path / "out"
    result = vlab_here(["predict", str(run), "--input", str(source), "--output", str(out)])
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())
