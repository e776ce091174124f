"""The bad-input corpus: every mistake a user can make gets a clear message naming the file and
what to do, exit status 2, no traceback, and nothing written.

Experiment files live in tests/bad_inputs/, each with its expected message on its first line
(`# expect: <text>`, including `:LINE:` where the error has a line). Data, checkpoint and
command-line mistakes are built by the tests below.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli

from vesuvius_lab.core.data.tiff import write_volume

CORPUS = sorted((Path(__file__).parent / "bad_inputs").glob("*.toml"))


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def assert_clear_failure(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_experiment_file_mistakes(path, tmp_path, vlab_here):
    expected = path.read_text().splitlines()[0].removeprefix("# expect:").strip()
    result = vlab_here(["validate", str(path)], tmp_path)
    assert_clear_failure(result, expected)
    assert str(path) in result.stderr or path.name in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written (the "code" in a string never ran)


def test_every_corpus_file_fails_in_one_run(tmp_path):
    """The one real `vlab validate` process of the corpus (the tests above run the command in this process)."""
    result = run_cli(["validate", *map(str, CORPUS)], tmp_path)
    assert result.returncode == 2
    assert f"problem(s) in {len(CORPUS)} file(s)" in result.stderr


def test_train_refuses_mistakes_before_writing_anything(synth_data, tmp_path):
    runs = tmp_path / "runs"
    syntax_error = Path(__file__).parent / "bad_inputs" / "syntax_missing_quote.toml"
    result = run_cli(["train", str(syntax_error)], tmp_path, VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert_clear_failure(result, "TOML syntax error")
    assert not runs.exists()


# --------------------------------------------------------------------------- data


def broken_copy(synth_data: Path, tmp_path: Path, damage) -> Path:
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    first = sorted((data / "train_images").glob("*.tif"))[0]
    damage(data, first.stem)
    return data


def truncate(data: Path, volume_id: str) -> None:
    path = data / "train_images" / f"{volume_id}.tif"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def symlink_loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)  # a link to itself


def replace_by_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


DATA_CASES = {
    "missing data folder": (lambda d, i: shutil.rmtree(d), "data folder not found"),
    "truncated tiff": (truncate, "truncated or damaged"),
    "not a tiff": (lambda d, i: (d / "train_images" / f"{i}.tif").write_bytes(b"garbage" * 100), "cannot decode"),
    "2D volume": (lambda d, i: tifffile.imwrite(d / "train_images" / f"{i}.tif", np.zeros((48, 48), np.uint8)),
                  "expected a 3D volume"),
    "4D volume": (lambda d, i: tifffile.imwrite(d / "train_images" / f"{i}.tif", np.zeros((2, 32, 48, 48), np.uint8)),
                  "expected a 3D volume"),
    "uint16 volume": (lambda d, i: write_volume(d / "train_images" / f"{i}.tif", np.zeros((32, 48, 48), np.uint16)),
                      "expected uint8 voxels"),
    "label values": (lambda d, i: write_volume(d / "train_labels" / f"{i}.tif", np.full((32, 48, 48), 7, np.uint8)),
                     "label values outside"),
    "shape mismatch": (lambda d, i: write_volume(d / "train_labels" / f"{i}.tif", np.zeros((32, 48, 40), np.uint8)),
                       "shape"),
    "csv id without file": (lambda d, i: (d / "train_images" / f"{i}.tif").unlink(), "file not found"),
    "image that is a symlink loop": (lambda d, i: symlink_loop(d / "train_images" / f"{i}.tif"), "a symlink loop"),
    "image that is a folder": (lambda d, i: replace_by_folder(d / "train_images" / f"{i}.tif"), "is a folder"),
    "window larger than every volume": (None, "larger than every training volume"),
}


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_training_on_bad_data_fails_before_creating_a_run(case, synth_data, tmp_path, vlab_here):
    damage, expected = DATA_CASES[case]
    data = broken_copy(synth_data, tmp_path, damage) if damage else synth_data
    experiment = tmp_path / "exp.toml"
    window = "[64, 64, 64]" if damage is None else "[8, 32, 32]"
    experiment.write_text(f'name = "bad-data"\n[data]\nwindow = {window}\nfolds = 3\n[model]\nplugin = "monai_unet"\n'
                          'params = { channels = [4, 8], strides = [2], num_res_units = 0 }\n')
    runs = tmp_path / "runs"
    result = vlab_here(["train", str(experiment)], tmp_path, VLAB_DATA=str(data), VLAB_RUNS=str(runs))
    assert_clear_failure(result, expected)
    assert not any((runs / "bad-data").glob("*")) if runs.exists() else True


def test_data_check_reports_every_problem_at_once(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    ids = sorted(p.stem for p in (data / "train_images").glob("*.tif"))
    truncate(data, ids[0])
    write_volume(data / "train_labels" / f"{ids[1]}.tif", np.full((32, 48, 48), 5, np.uint8))
    (data / "train_labels" / f"{ids[2]}.tif").unlink()
    for path in (data / "test_images").glob("*.tif"):
        path.unlink()
    result = run_cli(["data", "check", str(data)], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for fragment in (f"{ids[0]}.tif", f"{ids[1]}.tif", f"{ids[2]}.tif", "test_images"):
        assert fragment in result.stderr, fragment


# --------------------------------------------------------------------------- runs and checkpoints


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "tiny" / tiny_run.name
    shutil.copytree(tiny_run, run)
    return run


def test_checkpoint_that_is_not_a_checkpoint(tiny_run, synth_data, tmp_path, vlab_here):
    run = copy_run(tiny_run, tmp_path)
    (run / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint at all")
    before = snapshot(run)
    result = vlab_here(["predict", str(run), "--input", str(synth_data / "test_images"), "--output", "out"], tmp_path)
    assert_clear_failure(result, "not a readable vesuvius-lab checkpoint")
    assert snapshot(run) == before and not (tmp_path / "out").exists()


def test_checkpoint_of_another_model(tiny_run, synth_data, tmp_path, vlab_here):
    run = copy_run(tiny_run, tmp_path)
    spec_path = run / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["model"]["params"]["decoder_channels"] = [16, 16, 8]  # valid, but another network
    spec_path.write_text(json.dumps(spec))
    result = vlab_here(["predict", str(run), "--input", str(synth_data / "test_images"), "--output", "out"], tmp_path)
    assert_clear_failure(result, "this checkpoint is from model smp_unet25d")
    assert not (tmp_path / "out").exists()


def test_submit_with_an_empty_test_folder(tiny_run, tmp_path, vlab_here):
    (tmp_path / "empty").mkdir()
    result = vlab_here(["submit", str(tiny_run), "--input", "empty", "--output", "submission.zip"], tmp_path)
    assert_clear_failure(result, "holds no .tif volumes")
    assert not (tmp_path / "submission.zip").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, vlab_here):
    result = vlab_here(["train", "--resume", str(tmp_path)], tmp_path)
    assert_clear_failure(result, "not a run directory")


def test_unknown_command_option_and_missing_argument(tmp_path):
    assert run_cli(["trian"], tmp_path).returncode == 2
    assert run_cli(["train", "--nproc", "0", "x.toml"], tmp_path).returncode == 2
