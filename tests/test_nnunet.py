"""The nnU-Net backend: conversion, caching, fold mapping, validation checks, a tiny real training
and prediction equal to nnU-Net's own predictor; the skeleton-recall trainer, fold "all", starting
from an earlier run's weights and the patch_size param."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from vesuvius_lab.core import registry
from vesuvius_lab.core.contract.backend import SelfTrainingModel, TrainJob
from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.config.spec import Experiment, InferenceSpec
from vesuvius_lab.core.data.tiff import read_volume, write_volume
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.plugins.nnunet.checks import median_shape
from vesuvius_lab.plugins.nnunet.conversion import convert_dataset
from vesuvius_lab.plugins.nnunet.environment import forward_stdout, nnunet_environ
from vesuvius_lab.plugins.nnunet.params import NnUNetParams, Shrink
from vesuvius_lab.plugins.nnunet.prediction import PredictionSettings, prediction_settings
from vesuvius_lab.plugins.nnunet.shrink import apply_shrink, customize_plans
from vesuvius_lab.plugins.nnunet.splits import splits_from_folds

REPO = Path(__file__).resolve().parents[1]
SCROLLS = {"a": ["0", "3"], "b": ["1", "4"], "c": ["2"]}  # folds grouped by scroll
FOLDS = [SCROLLS["a"], SCROLLS["b"], SCROLLS["c"]]
TINY_PARAMS = {
    "planner": "nnUNetPlannerResEncM", "configuration": "3d_fullres", "augmentation_workers": 0,
    "preprocess_workers": 1, "val_iterations_per_epoch": 1,
    "shrink": {"patch_size": [32, 32, 32], "n_stages": 3, "features_per_stage": [8, 16, 32], "batch_size": 2},
}


# --------------------------------------------------------------------------- tiny data


def sheet_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like uint8 volume with two tilted bright sheets, and its labels 0 / 1 / 2 (edges unlabeled)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    label = np.zeros(shape, np.uint8)
    for offset in rng.uniform(0, shape[0], size=2):
        label[np.abs(0.3 * y + 0.2 * x + offset - z - shape[0] / 3) < 1.5] = 1
    image = np.clip(60 + 120 * label + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
    label[:2] = 2
    label[:, :, -2:] = 2
    return image, label


def write_tiny_dataset(root: Path, n: int = 5, side: int = 32, seed: int = 0) -> Path:
    """``n`` volumes of ``side``^3 over three scrolls, in the competition layout."""
    rng = np.random.default_rng(seed)
    scroll_of = {case: scroll for scroll, cases in SCROLLS.items() for case in cases}
    rows = []
    for index in range(n):
        image, label = sheet_volume((side,) * 3, rng)
        write_volume(root / "train_images" / f"{index}.tif", image)
        write_volume(root / "train_labels" / f"{index}.tif", label)
        rows.append((str(index), scroll_of.get(str(index), "c")))
    with open(root / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("id", "scroll_id"), *rows])
    return root


@pytest.fixture(scope="module")
def tiny_data(nnunet_data) -> Path:
    return nnunet_data[0]


def make_job(data: Path, run_dir: Path, cache: Path, fold: int | str, params: dict, log: list, *, epochs: int = 1,
             iterations: int = 2, nproc: int = 1, init: Path | None = None, ema: float | None = None) -> TrainJob:
    spec = Experiment.model_validate({
        "name": "nnunet-test", "data": {"root": str(data), "fold": fold},
        "model": {"plugin": "nnunet", "params": params},
        "train": {"epochs": epochs, "iterations_per_epoch": iterations, "nproc": nproc, "seed": 0, "workers": 0,
                  "ema": ema},
    })
    val_ids = [] if fold == "all" else FOLDS[fold]
    train_ids = [case for other in FOLDS for case in other if case not in val_ids]
    return TrainJob(spec=spec, data_root=data, train_ids=train_ids, val_ids=val_ids, fold=fold, folds=FOLDS,
                    run_dir=run_dir, cache_dir=cache, device="cpu", init=init, log=log.append)


def fold_folder(run_dir: Path) -> Path:
    """nnU-Net's fold folder of a run (checkpoints, training log)."""
    record = json.loads((run_dir / "backend" / "nnunet.json").read_text())
    return run_dir / "backend" / record["results"] / f"fold_{record['fold']}"


# --------------------------------------------------------------------------- conversion


def test_conversion_writes_nnunet_raw_layout(tiny_data, tmp_path):
    ids = ["0", "1", "2", "3", "4"]
    dataset = convert_dataset(tiny_data, ids, tmp_path / "nnUNet_raw", log=lambda message: None)

    assert dataset.folder == tmp_path / "nnUNet_raw" / dataset.name
    assert dataset.name.startswith(f"Dataset{dataset.id:03d}_VesuviusSurface_")
    for case in ids:
        image = dataset.folder / "imagesTr" / f"{case}_0000.tif"
        label = dataset.folder / "labelsTr" / f"{case}.tif"
        np.testing.assert_array_equal(read_volume(image), read_volume(tiny_data / "train_images" / f"{case}.tif"))
        np.testing.assert_array_equal(read_volume(label), read_volume(tiny_data / "train_labels" / f"{case}.tif"))
        for folder in ("imagesTr", "labelsTr"):
            spacing_file = dataset.folder / folder / f"{case}.json"
            assert json.loads(spacing_file.read_text()) == {"spacing": [1.0, 1.0, 1.0]}
    meta = json.loads((dataset.folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "surface": 1, "ignore": 2}
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["overwrite_image_reader_writer"] == "Tiff3DIO"
    assert meta["file_ending"] == ".tif" and meta["numTraining"] == 5
    assert sorted(p.name for p in (dataset.folder / "imagesTr").glob("*.tif")) == [f"{c}_0000.tif" for c in ids]


def test_conversion_is_cached_by_content(tiny_data, tmp_path):
    data = tmp_path / "data"
    write_tiny_dataset(data, n=4, seed=1)
    raw = tmp_path / "nnUNet_raw"
    messages: list[str] = []
    first = convert_dataset(data, ["0", "1", "2", "3"], raw, log=messages.append)
    stamp = (first.folder / "dataset.json").stat().st_mtime_ns

    again = convert_dataset(data, ["3", "2", "1", "0"], raw, log=messages.append)
    assert again == first
    assert (first.folder / "dataset.json").stat().st_mtime_ns == stamp
    assert "up to date" in messages[-1]

    subset = convert_dataset(data, ["0", "1"], raw, log=messages.append)
    assert subset.id != first.id and subset.folder != first.folder

    image, label = sheet_volume((32, 32, 32), np.random.default_rng(7))
    write_volume(data / "train_labels" / "0.tif", label)  # new content, same name
    changed = convert_dataset(data, ["0", "1", "2", "3"], raw, log=messages.append)
    assert changed.folder != first.folder
    np.testing.assert_array_equal(read_volume(changed.folder / "labelsTr" / "0.tif"), label)
    assert len([p for p in raw.iterdir() if p.name.startswith("Dataset")]) == 3


def test_conversion_rejects_unusable_volumes(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n=2)
    label = read_volume(data / "train_labels" / "1.tif")
    label[5, 5, 5] = 3
    write_volume(data / "train_labels" / "1.tif", label)
    with pytest.raises(UserError, match=r"1\.tif: label values \[3\]"):
        convert_dataset(data, ["0", "1"], tmp_path / "raw", log=lambda message: None)
    write_volume(data / "train_labels" / "1.tif", label[:-1])
    with pytest.raises(UserError, match="differs from its image"):
        convert_dataset(data, ["0", "1"], tmp_path / "raw", log=lambda message: None)
    with pytest.raises(UserError, match="9.tif: file not found"):
        convert_dataset(data, ["0", "9"], tmp_path / "raw", log=lambda message: None)
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith("Dataset")]


# --------------------------------------------------------------------------- folds, plans, settings


def test_splits_follow_our_folds():
    splits = splits_from_folds([["3", "0"], ["1", "4"], ["2"]])
    assert [s["val"] for s in splits] == [["0", "3"], ["1", "4"], ["2"]]
    assert [s["train"] for s in splits] == [["1", "2", "4"], ["0", "2", "3"], ["0", "1", "3", "4"]]


def _plans() -> dict:
    """A plans dict shaped like the ResEncM plans nnU-Net writes for 32^3 volumes."""
    return {"plans_name": "nnUNetResEncUNetMPlans", "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 5, "patch_size": [32, 32, 32],
        "architecture": {"arch_kwargs": {
            "n_stages": 4, "features_per_stage": [32, 64, 128, 256], "kernel_sizes": [[3, 3, 3]] * 4,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3, "n_blocks_per_stage": [1, 3, 4, 6],
            "n_conv_per_stage_decoder": [1, 1, 1]}}}}}


def test_shrink_edits_only_the_network_and_batch():
    plans = _plans()
    shrunk = apply_shrink(plans, "3d_fullres", Shrink(patch_size=[16, 32, 32], n_stages=3,
                                                      features_per_stage=[8, 16, 32], batch_size=2))
    config = shrunk["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    assert (config["patch_size"], config["batch_size"]) == ([16, 32, 32], 2)
    assert arch["n_stages"] == 3 and arch["features_per_stage"] == [8, 16, 32]
    assert len(arch["strides"]) == len(arch["kernel_sizes"]) == len(arch["n_blocks_per_stage"]) == 3
    assert arch["n_conv_per_stage_decoder"] == [1, 1]
    assert config["data_identifier"] == "nnUNetPlans_3d_fullres"  # the preprocessed data is reused
    assert shrunk["plans_name"] == "nnUNetResEncUNetMPlans__shrunk"
    assert plans == _plans()  # the input is not modified
    with pytest.raises(UserError, match="divisible"):
        apply_shrink(plans, "3d_fullres", Shrink(patch_size=[18, 32, 32], n_stages=3))
    with pytest.raises(UserError, match="only 4 stages"):
        apply_shrink(plans, "3d_fullres", Shrink(n_stages=5))


def test_patch_size_param_keeps_the_planned_network():
    plans = _plans()
    bigger = customize_plans(plans, "3d_fullres", None, [64, 96, 128])
    config = bigger["configurations"]["3d_fullres"]
    assert config["patch_size"] == [64, 96, 128]
    assert config["architecture"] == plans["configurations"]["3d_fullres"]["architecture"]
    assert config["batch_size"] == 5 and bigger["plans_name"] == plans["plans_name"]
    assert plans == _plans()
    shrunk = customize_plans(plans, "3d_fullres", Shrink(n_stages=3, features_per_stage=[8, 16, 32]), [16, 32, 32])
    assert shrunk["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 32]
    assert shrunk["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_stages"] == 3
    with pytest.raises(UserError, match=r"params.patch_size \[20, 32, 32\]: each side must be divisible"):
        customize_plans(plans, "3d_fullres", None, [20, 32, 32])
    with pytest.raises(UserError, match="both set the patch size"):
        customize_plans(plans, "3d_fullres", Shrink(patch_size=[16, 32, 32]), [16, 32, 32])


def test_inference_settings_map_to_nnunet_predictor():
    params = NnUNetParams()
    assert prediction_settings(params, InferenceSpec()) == PredictionSettings(0.5, True, False, None)
    mapped = prediction_settings(params, InferenceSpec(overlap=0.25, blend={"plugin": "mean"},
                                                       tta=["flip2", "flip0"]))
    assert mapped == PredictionSettings(0.75, False, True, (0, 2))
    assert prediction_settings(NnUNetParams(mirroring=True), InferenceSpec()).use_mirroring
    with pytest.raises(UserError, match="rot90"):
        prediction_settings(params, InferenceSpec(tta=["rot90"]))
    with pytest.raises(UserError, match="either params.mirroring"):
        prediction_settings(NnUNetParams(mirroring=False), InferenceSpec(tta=["flip1"]))
    with pytest.raises(UserError, match="sigma_scale"):
        prediction_settings(params, InferenceSpec(blend={"plugin": "gaussian", "params": {"sigma_scale": 0.2}}))


def test_environment_is_set_for_the_call_only(monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/somewhere/else")
    monkeypatch.delenv("nnUNet_results", raising=False)
    with nnunet_environ(raw=Path("/cache/raw"), results=Path("/run/results"), workers=3, augmentation_workers=0):
        assert os.environ["nnUNet_raw"] == "/cache/raw" and os.environ["nnUNet_results"] == "/run/results"
        assert os.environ["nnUNet_def_n_proc"] == "3" and os.environ["nnUNet_n_proc_DA"] == "0"
    assert os.environ["nnUNet_raw"] == "/somewhere/else" and "nnUNet_results" not in os.environ

    lines: list[str] = []
    with forward_stdout(lambda line: (lines.append(line), print("echo", line))):
        print("Epoch 0")
        print("train_loss", 1.5, end="")
    assert lines == ["Epoch 0", "train_loss 1.5"]


# --------------------------------------------------------------------------- vlab validate


def _experiment(tmp_path: Path, params: str, extra: str = "") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(f'name = "x"\n[model]\nplugin = "nnunet"\nparams = {params}\n{extra}')
    return path


def test_validate_reports_nnunet_problems(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("VLAB_DATA", str(tiny_data))  # 32^3 volumes: far too small for 3d_lowres
    with pytest.raises(SpecError) as caught:
        load_experiment(_experiment(tmp_path, '{ trainer = "nnUNetTrainr", configuration = "3d_lowres" }',
                                    '[inference]\nblend = { plugin = "ramp" }\n'))
    problems = {p.path: p.message for p in caught.value.problems}
    assert 'Did you mean "nnUNetTrainer"' in problems["model.params.trainer"]
    assert "does not create 3d_lowres" in problems["model.params.configuration"]
    assert "'3d_fullres'" in problems["model.params.configuration"]
    assert '"ramp"' in problems["model.params"]

    synthetic = tmp_path / "synthetic"  # the demo data: too small as well, but full-size files are not for it
    write_tiny_dataset(synthetic, n=1)
    (synthetic / ".vlab-synthetic.json").write_text("{}")
    monkeypatch.setenv("VLAB_DATA", str(synthetic))
    assert load_experiment(_experiment(tmp_path, '{ configuration = "3d_lowres" }')).spec.model.plugin == "nnunet"
    monkeypatch.setenv("VLAB_DATA", str(tiny_data))

    with pytest.raises(SpecError, match="nnU-Net splits each batch over its DDP processes"):
        load_experiment(_experiment(tmp_path, "{ shrink = { batch_size = 1 } }", "[train]\nnproc = 2\n"))

    loaded = load_experiment(_experiment(tmp_path, '{ trainer = "nnUNetTrainerNoMirroring" }'))
    assert isinstance(registry.build("models", "nnunet", loaded.spec.model.params), SelfTrainingModel)

    # the plugin's own trainer is known by name without importing anything heavy
    loaded = load_experiment(_experiment(tmp_path, '{ trainer = "nnUNetTrainerSkeletonRecall" }'))
    assert loaded.spec.model.params["trainer"] == "nnUNetTrainerSkeletonRecall"
    with pytest.raises(SpecError, match='Did you mean "nnUNetTrainerSkeletonRecall"'):
        load_experiment(_experiment(tmp_path, '{ trainer = "nnUNetTrainerSkeletonRecal" }'))


def test_validate_refuses_two_patch_sizes(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("VLAB_DATA", str(tiny_data))
    with pytest.raises(SpecError) as caught:
        load_experiment(_experiment(tmp_path, "{ patch_size = [32, 32, 32], shrink = { patch_size = [16, 32, 32] } }"))
    (problem,) = [p for p in caught.value.problems if p.path == "model.params.patch_size"]
    assert "both set the patch size" in problem.message and "Keep one" in problem.message
    with pytest.raises(SpecError, match="needs 3 sides, got 2"):
        load_experiment(_experiment(tmp_path, "{ patch_size = [32, 32] }"))
    with pytest.raises(SpecError, match="divisible by 4"):
        load_experiment(_experiment(tmp_path, "{ patch_size = [30, 32, 32], shrink = { n_stages = 3 } }"))
    assert load_experiment(_experiment(tmp_path, "{ patch_size = [32, 64, 64] }")).spec.model.plugin == "nnunet"


@pytest.mark.parametrize("name", ["experiments/quick/nnunet.toml", "experiments/nnunet_resencm_lowres.toml",
                                  "experiments/nnunet_skeleton_recall_lowres.toml",
                                  "experiments/nnunet_1st_p128_all.toml", "experiments/nnunet_1st_p192_finetune.toml",
                                  "experiments/nnunet_1st_p256_finetune.toml"])
def test_example_experiments_validate(name, tiny_data, tmp_path, monkeypatch):
    if "lowres" in name:  # the seed's setup is for the competition's 320^3 volumes
        write_volume(tmp_path / "train_images" / "a.tif", np.zeros((320, 320, 320), np.uint8))
        assert median_shape(tmp_path) == (320, 320, 320)  # so the 3d_lowres check does run
        monkeypatch.setenv("VLAB_DATA", str(tmp_path))
    else:
        monkeypatch.setenv("VLAB_DATA", str(tiny_data))
    monkeypatch.chdir(REPO)
    loaded = load_experiment(REPO / name)
    assert loaded.spec.model.plugin == "nnunet"


# --------------------------------------------------------------------------- training and prediction


@pytest.fixture(scope="module")
def trained(nnunet_data, tmp_path_factory):
    """One real nnU-Net training of fold 0: shrunk ResEncM plan, 1 epoch of 2 iterations, CPU."""
    root = tmp_path_factory.mktemp("nnunet-run")
    log: list[str] = []
    data, cache = nnunet_data
    job = make_job(data, root / "run", cache, 0, TINY_PARAMS, log)
    model = registry.build("models", "nnunet", job.spec.model.params)
    model.train(job)
    return job, model, log


@pytest.mark.slow
def test_training_uses_our_fold_and_shrunk_plan(trained):
    job, _, log = trained
    backend = job.run_dir / "backend"
    record = json.loads((backend / "nnunet.json").read_text())
    (view,) = (backend / "nnUNet_preprocessed").iterdir()
    assert json.loads((view / "splits_final.json").read_text()) == splits_from_folds(FOLDS)
    plans = json.loads((view / f"{record['plans_name']}.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == [8, 16, 32]
    fold_folder = backend / record["results"] / "fold_0"
    assert (fold_folder / "checkpoint_final.pth").is_file()
    nnunet_log = next(fold_folder.glob("training_log_*.txt")).read_text()
    assert "Desired fold for training: 0" in nnunet_log
    assert "This split has 3 training and 2 validation cases." in nnunet_log
    output = (backend / "nnunet.log").read_text()  # what nnU-Net printed goes to the run folder ...
    assert "Training done." in output and "Pseudo dice" in output
    assert not any("Training done." in line or "Pseudo dice" in line for line in log)  # ... not to the console
    assert any("Set params.momentum = 0.9" in line for line in log)  # 2 steps with momentum 0.99: the note
    (epoch,) = [line for line in log if line.startswith("epoch ")]  # one line per epoch, as every model prints
    assert re.fullmatch(r"epoch 1: loss -?\d+\.\d{4}, lr \d\.\d\de-\d\d, \d+\.\d samples/s, "
                        r"val loss -?\d+\.\d{4}, pseudo-Dice \d\.\d{4}", epoch), epoch


@pytest.mark.slow
def test_rerun_reuses_cache_and_finished_training(trained):
    job, model, _ = trained
    log: list[str] = []
    again = make_job(job.data_root, job.run_dir, job.cache_dir, 0, TINY_PARAMS, log, nproc=2)
    model.train(again)
    text = "\n".join(log)
    assert "raw dataset up to date" in text
    assert "fingerprint" not in text and "planning" not in text and "preprocessing" not in text
    assert "needs CUDA GPUs; training in 1 process" in text
    assert "training already finished" in text

    other_fold: list[str] = []
    setup = model.prepare(make_job(job.data_root, job.run_dir.parent / "run-fold1", job.cache_dir, 1,
                                   TINY_PARAMS, other_fold))
    assert setup.fold == 1 and "preprocessing" not in "\n".join(other_fold)
    splits = json.loads((setup.preprocessed_view / setup.plans["dataset_name"] / "splits_final.json").read_text())
    assert splits[1]["val"] == ["1", "4"]


@pytest.mark.slow
def test_prediction_equals_nnunet_own_prediction(trained, tmp_path):
    """Our load + predict_probabilities against nnU-Net's file-based predictor, same settings."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    job, _, _ = trained
    image, _ = sheet_volume((40, 32, 48), np.random.default_rng(11))  # 2 x 1 x 2 overlapping 32^3 windows
    raw = tmp_path / "raw"
    write_volume(raw / "case_0000.tif", image)
    (raw / "case.json").write_text(json.dumps({"spacing": [1, 1, 1]}))

    inference = InferenceSpec(overlap=0.25, blend={"plugin": "gaussian"}, tta=["flip2"])
    ours = registry.build("models", "nnunet", TINY_PARAMS, inference=inference)
    ours.load(job.run_dir, "cpu")
    probabilities = ours.predict_probabilities(image)

    record = json.loads((job.run_dir / "backend" / "nnunet.json").read_text())
    reference = nnUNetPredictor(tile_step_size=0.75, use_gaussian=True, use_mirroring=True,
                                device=torch.device("cpu"), allow_tqdm=False)
    reference.initialize_from_trained_model_folder(str(job.run_dir / "backend" / record["results"]), (0,),
                                                   "checkpoint_final.pth")
    reference.allowed_mirroring_axes = (2,)  # the trainer allows (0, 1, 2); tta asked for flip2 only
    (tmp_path / "out").mkdir()
    # nnU-Net's file path: Tiff3DIO reading, its preprocessor, its export (in-process: no spawn pools)
    reference.predict_from_files_sequential([[str(raw / "case_0000.tif")]], [str(tmp_path / "out" / "case")],
                                            save_probabilities=True)
    expected = np.load(tmp_path / "out" / "case.npz")["probabilities"][1]

    assert probabilities.dtype == np.float32 and probabilities.shape == image.shape
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert probabilities.std() > 0.01  # a real prediction, not a constant

    plain = registry.build("models", "nnunet", TINY_PARAMS, inference=InferenceSpec(blend={"plugin": "mean"}))
    plain.load(job.run_dir, "cpu")
    assert np.abs(plain.predict_probabilities(image) - expected).max() > 1e-4  # the settings do matter


@pytest.mark.slow
def test_stopped_training_resumes_from_latest_checkpoint(trained, tmp_path):
    import shutil

    import torch

    job, model, _ = trained
    run = tmp_path / "run"
    shutil.copytree(job.run_dir, run)
    record = json.loads((run / "backend" / "nnunet.json").read_text())
    fold = run / "backend" / record["results"] / "fold_0"
    (fold / "checkpoint_final.pth").rename(fold / "checkpoint_latest.pth")  # as if stopped after epoch 1

    log: list[str] = []
    model.train(make_job(job.data_root, run, job.cache_dir, 0, TINY_PARAMS, log, epochs=2))
    assert any("resuming from epoch 1" in line for line in log)
    assert [line.split(":")[0] for line in log if line.startswith("epoch ")] == ["epoch 2"]
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 2


@pytest.mark.slow
def test_an_nnunet_run_opens_as_self_training_and_the_leaderboard_shows_what_it_used(trained, tmp_path):
    """The run-kind table opens an nnU-Net run through its backend, and its row names nnU-Net's own loss and
    blending, not the [[loss]] defaults of the spec that it never used."""
    import shutil

    from vesuvius_lab.core.inference.run_kinds import load_run, run_kind
    from vesuvius_lab.core.reports.compare import compare_runs
    from vesuvius_lab.core.reports.leaderboard import build_leaderboard
    from vesuvius_lab.core.runs.folder import Run
    from vesuvius_lab.core.runs.summary import write_summary

    job, model, _ = trained
    run = Run(tmp_path / "runs" / "tiny-nnunet" / "fold0-1")
    shutil.copytree(job.run_dir, run.path)
    run.write("spec.json", job.spec.model_dump(mode="json"))
    run.write("scores.json", {"mean": {"score": 0.5}, "volumes": []})
    assert run_kind(job.spec, model) == "self_training"
    write_summary(run, job.spec, wall_time=1.0, parameters=None, epochs_done=1, best_epoch=1,
                  kind=run_kind(job.spec, model), components=model.components)

    predictor = load_run(run.path)
    assert predictor.kind == "self_training"
    image, _ = sheet_volume((32, 32, 32), np.random.default_rng(5))
    model.load(run.path, "cpu")
    np.testing.assert_array_equal(predictor.probabilities(image), model.predict_probabilities(image))

    assert [t.plugin for t in job.spec.loss] == ["dice", "bce"]  # the spec's defaults, never used by nnU-Net
    (row,) = build_leaderboard(run.path.parent.parent).rows
    assert row.plugins["loss"] == "nnU-Net nnUNetTrainer (its own)"
    assert row.plugins["blend"] == "nnU-Net gaussian"

    other = Run(tmp_path / "runs" / "tiny-nnunet" / "fold0-2")
    shutil.copytree(run.path, other.path)
    other.write("spec.json", job.spec.model_copy(update={"loss": job.spec.loss[:1]}).model_dump(mode="json"))
    comparison = compare_runs(run, other)
    assert ("loss", "nnU-Net nnUNetTrainer (its own)", "nnU-Net nnUNetTrainer (its own)") in comparison.components


# --------------------------------------------------------------------------- skeleton recall


def _sheet_label(shape=(2, 1, 12, 24, 24)) -> "torch.Tensor":
    """Labels (B, 1, D, H, W): a 4-voxel-thick sheet of surface, a band of ignore voxels across it."""
    import torch

    label = torch.zeros(shape, dtype=torch.int16)
    label[:, :, 4:8] = 1
    label[:, :, :, :6] = 2
    return label


def _skeleton_of(label) -> "torch.Tensor":
    import torch

    from vesuvius_lab.core.data.skeleton import skeleton_target

    return torch.stack([torch.from_numpy(skeleton_target(sample[0].numpy()))[None] for sample in label]).to(label.dtype)


def test_skeleton_recall_loss_is_zero_when_the_skeleton_is_found_and_blind_to_ignored_voxels():
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from vesuvius_lab.plugins.nnunet.trainer_classes.skeleton_recall import (DiceCEAndSkeletonRecallLoss,
                                                                              SkeletonRecallLoss)

    label = _sheet_label()
    skeleton = _skeleton_of(label)
    assert skeleton.sum() > 0 and not skeleton[label == 2].any() and bool((label[skeleton > 0] == 1).all())
    found = torch.where(label == 1, 10.0, -10.0).float()
    perfect = torch.cat((-found, found), 1)  # logits (background, surface)
    recall = SkeletonRecallLoss()
    assert recall(torch.softmax(perfect, 1)[:, 1:], skeleton, label != 2).item() < 1e-6
    assert recall(torch.softmax(-perfect, 1)[:, 1:], skeleton, label != 2).item() > 0.99

    # as nnU-Net's trainer builds it
    dice_ce = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                             weight_dice=1, ignore_label=2, dice_class=MemoryEfficientSoftDiceLoss)
    loss = DiceCEAndSkeletonRecallLoss(dice_ce, ignore_label=2)
    everywhere = torch.ones_like(skeleton)  # a skeleton that also covers ignored voxels: the mask must drop them
    for target_skeleton in (skeleton, everywhere):
        logits = torch.randn(label.shape[0], 2, *label.shape[2:], requires_grad=True)
        loss(logits, torch.cat((label, target_skeleton), 1)).backward()
        ignored = (label == 2).expand_as(logits)
        assert logits.grad[ignored].abs().max().item() == 0.0
        assert logits.grad[~ignored].abs().max().item() > 0.0
    recall_only = DiceCEAndSkeletonRecallLoss(dice_ce, ignore_label=2, weight=1.0)
    logits = torch.randn(label.shape[0], 2, *label.shape[2:], requires_grad=True)
    (recall_only(logits, torch.cat((label, everywhere), 1)) - dice_ce(logits, label)).backward()
    assert logits.grad[(label == 2).expand_as(logits)].abs().max().item() == 0.0  # the recall term alone


def test_skeleton_targets_come_from_the_augmentation_pipeline_at_every_scale():
    import torch

    from vesuvius_lab.plugins.nnunet.trainers import trainer_class

    trainer = trainer_class("nnUNetTrainerSkeletonRecall")
    scales = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    training = trainer.get_training_transforms([12, 24, 24], (-0.3, 0.3), scales, (0, 1, 2), False, ignore_label=2)
    validation = trainer.get_validation_transforms(scales, ignore_label=2)
    label = _sheet_label((1, 12, 24, 24))
    for transforms in (training, validation):
        torch.manual_seed(0)
        out = transforms(image=torch.randn(1, 12, 24, 24), segmentation=label.clone())["segmentation"]
        assert [tuple(t.shape) for t in out] == [(2, 12, 24, 24), (2, 6, 12, 12), (2, 3, 6, 6)]
        full_label, full_skeleton = out[0][0].numpy(), out[0][1].numpy()
        # the skeleton of the augmented label
        np.testing.assert_array_equal(full_skeleton, _skeleton_of(out[0][None, :1])[0, 0].numpy())
        assert full_skeleton.any() and (full_label[full_skeleton > 0] == 1).all()
        assert all(t[1].any() for t in out)  # max-pooled: the thin skeleton is at every scale
    assert (out[1][1] == torch.nn.functional.max_pool3d(out[0][1:2].float()[None], 2)[0, 0]).all()


@pytest.mark.slow
def test_skeleton_recall_trainer_trains_and_its_loss_ignores_label_2(trained, tmp_path):
    """The plugin's trainer by name: a real training, then its real loss on a batch of its real pipeline."""
    import torch

    from vesuvius_lab.plugins.nnunet.training import build_trainer

    job, _, _ = trained
    params = {**TINY_PARAMS, "trainer": "nnUNetTrainerSkeletonRecall"}
    log: list[str] = []
    recall_job = make_job(job.data_root, tmp_path / "run", job.cache_dir, 0, params, log)
    model = registry.build("models", "nnunet", params)
    model.train(recall_job)
    folder = fold_folder(recall_job.run_dir)
    assert (folder / "checkpoint_final.pth").is_file() and "nnUNetTrainerSkeletonRecall__" in str(folder)
    assert model.components["loss"] == "nnU-Net nnUNetTrainerSkeletonRecall (its own)"
    assert any(line.startswith("epoch 1: loss ") and "pseudo-Dice" in line for line in log)

    setup = model.prepare(recall_job)
    with setup.environ(), forward_stdout(lambda line: None):
        trainer = build_trainer(setup, "cpu")
        trainer.initialize()
        loader, _ = trainer.get_dataloaders()
        batch = next(loader)
    targets = batch["target"]
    assert len(targets) == 2 and [t.shape[1] for t in targets] == [2, 2]  # (label, skeleton) per output scale
    label, skeleton = targets[0][:, 0], targets[0][:, 1]
    assert skeleton.any() and bool((label[skeleton > 0] == 1).all())
    outputs = [o.detach().requires_grad_() for o in trainer.network(batch["data"])]
    trainer.loss(outputs, targets).backward()
    checked = 0
    for output, target in zip(outputs, targets):
        if output.grad is None:  # nnU-Net gives the lowest resolution the weight 0
            continue
        ignored = (target[:, :1] == 2).expand_as(output)
        assert ignored.any() and output.grad[ignored].abs().max().item() == 0.0
        assert output.grad[~ignored].abs().max().item() > 0.0
        checked += 1
    assert checked == 1  # 3 stages: two outputs, nnU-Net weighs the lower one 0


@pytest.mark.slow
def test_ema_validates_and_saves_the_average_and_keeps_the_raw_weights_for_resuming(trained, tmp_path):
    import torch

    from vesuvius_lab.plugins.nnunet.training import build_trainer

    job, model, _ = trained
    ema_job = make_job(job.data_root, tmp_path / "run", job.cache_dir, 0, TINY_PARAMS, [], iterations=3, ema=0.9)
    model.train(ema_job)
    folder = fold_folder(ema_job.run_dir)
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    beside = torch.load(folder / "checkpoint_final.pth.raw", map_location="cpu", weights_only=True)
    assert beside["updates"] == 3
    floats = [key for key, value in final.items() if value.dtype.is_floating_point]
    assert any(not torch.equal(final[key], beside["raw"][key]) for key in floats)  # the average is not the raw

    setup = model.prepare(ema_job)
    with setup.environ(), forward_stdout(lambda line: None):
        trainer = build_trainer(setup, "cpu", resume=True)
        trainer.load_checkpoint(str(folder / "checkpoint_best.pth"))  # written after validating the average
    best = torch.load(folder / "checkpoint_best.pth", map_location="cpu", weights_only=False)["network_weights"]
    raw = torch.load(folder / "checkpoint_best.pth.raw", map_location="cpu", weights_only=True)["raw"]
    network = trainer.network.state_dict()
    assert all(torch.equal(network[key], raw[key]) for key in floats)  # training goes on from the raw weights
    assert any(not torch.equal(best[key], raw[key]) for key in floats)


@pytest.mark.slow
def test_fold_all_trains_on_every_volume(trained, tmp_path):
    job, model, _ = trained
    log: list[str] = []
    all_job = make_job(job.data_root, tmp_path / "run", job.cache_dir, "all", TINY_PARAMS, log)
    model.train(all_job)
    record = json.loads((all_job.run_dir / "backend" / "nnunet.json").read_text())
    assert record["fold"] == "all"
    folder = fold_folder(all_job.run_dir)
    assert folder.name == "fold_all" and (folder / "checkpoint_final.pth").is_file()
    debug = json.loads((folder / "debug.json").read_text())
    assert debug["fold"] == "all"
    assert any(line.startswith("epoch 1: ") for line in log)
    predictor = registry.build("models", "nnunet", TINY_PARAMS)
    predictor.load(all_job.run_dir, "cpu")
    image, _ = sheet_volume((32, 32, 32), np.random.default_rng(3))
    assert predictor.predict_probabilities(image).shape == image.shape


@pytest.mark.slow
def test_init_from_an_earlier_run_at_another_patch_size(trained, tmp_path):
    """[train] init names the earlier run; the new run trains at patch_size 16x32x32 (the earlier at 32^3), and
    records and logs what it loaded. A learning rate of ~0 keeps the loaded weights visible after training."""
    import torch

    job, _, _ = trained
    shrink = {key: value for key, value in TINY_PARAMS["shrink"].items() if key != "patch_size"}
    params = {**TINY_PARAMS, "shrink": shrink, "patch_size": [16, 32, 32], "initial_lr": 1e-12}
    log: list[str] = []
    new = make_job(job.data_root, tmp_path / "run", job.cache_dir, 0, params, log, init=job.run_dir)
    registry.build("models", "nnunet", params).train(new)

    source = fold_folder(job.run_dir) / "checkpoint_final.pth"
    record = json.loads((new.run_dir / "backend" / "nnunet.json").read_text())
    assert record["init"] == str(source)
    (line,) = [line for line in log if line.startswith("nnU-Net: initialised from")]
    assert str(source) in line and "segmentation-head tensors start fresh" in line
    folder = fold_folder(new.run_dir)
    assert "initialised from" in next(folder.glob("training_log_*.txt")).read_text()
    plans = json.loads((folder.parent / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 32]

    before = torch.load(source, weights_only=False)["network_weights"]
    after = torch.load(folder / "checkpoint_final.pth", weights_only=False)["network_weights"]
    kept = [name for name in after if ".seg_layers." not in name]
    assert kept and all(torch.allclose(before[name].float(), after[name].float(), atol=1e-6) for name in kept)
    assert any(not torch.equal(before[name], after[name]) for name in after if ".seg_layers." in name)


@pytest.mark.slow
def test_init_whose_layers_do_not_fit_is_refused_before_training(trained, tmp_path):
    job, _, _ = trained
    params = {**TINY_PARAMS, "shrink": {**TINY_PARAMS["shrink"], "n_stages": 2, "features_per_stage": [8, 16]}}
    checkpoint = fold_folder(job.run_dir) / "checkpoint_final.pth"
    run = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        registry.build("models", "nnunet", params).train(make_job(job.data_root, run, job.cache_dir, 0, params, [],
                                                                  init=checkpoint))
    message = str(caught.value)
    assert f"the weights in {checkpoint} do not fit this nnU-Net network" in message
    assert "have another shape: decoder." in message and "there," in message and "here)" in message
    assert not (run / "backend" / "nnUNet_results").exists()  # no training started

    with pytest.raises(UserError, match="not an nnU-Net run"):
        registry.build("models", "nnunet", TINY_PARAMS).train(make_job(job.data_root, tmp_path / "other", job.cache_dir,
                                                                       0, TINY_PARAMS, [], init=tmp_path))


@pytest.mark.slow
def test_an_nnunet_run_predicts_blocks_of_a_large_volume_exactly_through_its_window_network(trained):
    """Block-wise prediction runs nnU-Net's network (its CT normalisation inside) through the core's
    sliding windows: blocks equal the core's whole-volume blend, and that blend is close to nnU-Net's own."""
    from vesuvius_lab.core.inference.blocks import ArrayReader, BlockPlan, Box, predict_block
    from vesuvius_lab.core.inference.engine import predict_volume

    job, _, _ = trained
    image, _ = sheet_volume((45, 38, 50), np.random.default_rng(12))
    model = registry.build("models", "nnunet", TINY_PARAMS, inference=InferenceSpec(overlap=0.5, tta=["flip1"]))
    model.load(job.run_dir, "cpu")
    network, inference = model.window_model()
    assert inference.window == (32, 32, 32) and inference.tta == ["flip1"] and inference.blend.plugin == "gaussian"
    whole = predict_volume(image, network, inference)
    blocks = np.zeros_like(whole)
    for block in BlockPlan(image.shape, Box.of_shape(image.shape), (16, 24, 32)).blocks():
        blocks[block.core.slices] = predict_block(ArrayReader(image), block.core, network, inference)
    assert np.abs(blocks - whole).max() <= 1e-5
    own = model.predict_probabilities(image)  # nnU-Net's tiling and mirroring differ a little, not its network
    assert np.corrcoef(own.ravel(), whole.ravel())[0, 1] > 0.95
