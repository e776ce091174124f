"""The built-in plugins' params are checked by `vlab validate` as deeply as they can be without
building a network: every mistake below used to pass validation and fail only inside `vlab train`
(or crash validation with a traceback). Each case is an experiment file with one mistake; all of
them are validated by one run of the real command line, and each must be reported with its file,
`:LINE:`, key path and advice, exit status 2 and no traceback. Valid files using the same features
still pass, and `vlab train` of a bad file writes nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
QUICK = sorted((REPO / "experiments" / "quick").glob("*.toml"))


def experiment(*, model: str = "monai_unet", params: str = "{}", window: str = "[16, 64, 64]",
               data: str = "", extra: str = "") -> str:
    """An experiment whose model params are on line 7 and whose ``extra`` tables start on line 8."""
    return "\n".join([
        'name = "case"',                      # 1
        "[data]",                             # 2
        f"window = {window}",                 # 3
        data or "# no other data keys",       # 4
        "[model]",                            # 5
        f'plugin = "{model}"',                # 6
        f"params = {params}",                 # 7
        extra,                                # 8 ...
    ]) + "\n"


def postprocess(params: str, plugin: str = "hole_stitching_unet") -> str:
    """A [[postprocess]] table on lines 8-10 (its params on line 10)."""
    return f'[[postprocess]]\nplugin = "{plugin}"\nparams = {params}'


#: name: (experiment file, line, key path, text the message must contain)
CASES = {
    # ---- segmentation-models-pytorch
    "smp_unknown_encoder": (
        experiment(model="smp_unet25d", params='{ encoder = "resnet181" }'),
        7, "model.params.encoder", 'is not an encoder segmentation-models-pytorch'),
    "smp_unknown_timm_model": (
        experiment(model="smp_unet25d", params='{ encoder = "tu-resnet181" }'),
        7, "model.params.encoder", 'has no model "resnet181" (encoder "tu-resnet181"). Did you mean "tu-resnet18"?'),
    "smp_timm_model_without_stages": (
        experiment(model="smp_unet25d", params='{ encoder = "tu-vit_tiny_patch16_224" }'),
        7, "model.params.encoder", 'cannot use the timm model "vit_tiny_patch16_224" as an encoder of depth 5'),
    "smp_unetpp_mix_transformer": (
        experiment(model="smp_unetpp25d", params='{ encoder = "mit_b0" }'),
        7, "model.params.encoder", 'cannot build UnetPlusPlus with the encoder "mit_b0"'),
    "smp_zero_decoder_width": (
        experiment(model="smp_unet25d", params="{ encoder_depth = 2, decoder_channels = [0, 8] }"),
        7, "model.params.decoder_channels", "every decoder width must be at least 1, got [0, 8]"),
    # ---- MONAI
    "swinunetr_zero_heads": (  # was a ZeroDivisionError traceback
        experiment(model="monai_swinunetr", params="{ num_heads = [3, 6, 0, 24] }", window="[64, 64, 64]"),
        7, "model.params.num_heads", "every entry is a count of attention heads, so at least 1"),
    "swinunetr_negative_depth": (
        experiment(model="monai_swinunetr", params="{ depths = [2, 2, -1, 2] }", window="[64, 64, 64]"),
        7, "model.params.depths", "every entry is a count of Swin blocks, so at least 1"),
    "unet_zero_channels": (
        experiment(params="{ channels = [4, 0, 8], strides = [2, 2] }"),
        7, "model.params.channels", "every entry is a feature count, so at least 1; got [4, 0, 8]"),
    "unet_batch_norm_single_voxel": (
        experiment(params='{ norm = "batch" }', window="[16, 16, 16]", extra="[train]\nbatch_size = 1"),
        7, "model.params.norm", "batch norm sees one value per channel there"),
    "segresnet_negative_blocks": (
        experiment(model="monai_segresnet", params="{ blocks_down = [1, -1, 2], blocks_up = [1, 1] }"),
        7, "model.params.blocks_down", "every entry is a count of residual blocks, so at least 0"),
    # ---- nnU-Net
    "nnunet_unknown_trainer": (
        experiment(model="nnunet", params='{ trainer = "nnUNetTrainr" }'),
        7, "model.params.trainer", 'nnU-Net has no trainer class "nnUNetTrainr". Did you mean "nnUNetTrainer"?'),
    "nnunet_trainer_module_missing": (
        experiment(model="nnunet", params='{ trainer = "no_such_package.trainers:MyTrainer" }'),
        7, "model.params.trainer", 'module "no_such_package.trainers" of trainer'),
    "nnunet_trainer_class_missing": (
        experiment(model="nnunet", params='{ trainer = "vesuvius_lab.core.errors:NoSuchTrainer" }'),
        7, "model.params.trainer", 'module "vesuvius_lab.core.errors" has no class "NoSuchTrainer"'),
    "nnunet_trainer_not_a_trainer": (
        experiment(model="nnunet", params='{ trainer = "vesuvius_lab.core.errors:UserError" }'),
        7, "model.params.trainer", "is not a subclass of nnUNetTrainer"),
    "nnunet_zero_patch_side": (
        experiment(model="nnunet", params="{ shrink = { patch_size = [0, 64, 64] } }"),
        7, "model.params.shrink.patch_size", "every entry of patch_size must be at least 1"),
    # ---- losses
    "stitch_loss_on_segmentation": (
        experiment(extra='[[loss]]\nplugin = "stitch"\nparams = { damage_weight = 3.0 }'),
        10, "loss.0.params.damage_weight", 'Set damage_weight = 0 or task = "hole_stitching"'),
    # ---- the hole stitcher, as a model and as a post-processing step
    "stitcher_model_single_voxel": (
        experiment(model="hole_stitcher_unet", params="{ channels = [8, 16, 32] }", window="[4, 4, 4]",
                   data='task = "hole_stitching"'),
        7, "model.params.channels", "shrinks to a single voxel at the bottom of this 3-level UNet"),
    "stitcher_checkpoint_missing": (
        experiment(extra=postprocess('{ checkpoint = "no_such_stitcher.pt" }')),
        10, "postprocess.0.params.checkpoint", 'no file "no_such_stitcher.pt"'),
    "stitcher_checkpoint_unreadable": (
        experiment(extra=postprocess('{ checkpoint = "garbage.pt" }')),
        10, "postprocess.0.params.checkpoint", "cannot read this checkpoint"),
    "stitcher_checkpoint_window_not_multiple": (
        experiment(extra=postprocess('{ checkpoint = "stitcher.pt", window = [6, 8, 8] }')),
        10, "postprocess.0.params.window", "every side must be a multiple of 4"),
    "stitcher_run_of_another_model": (
        experiment(extra=postprocess('{ run = "segmenter/run1" }')),
        10, "postprocess.0.params.run", 'is a run of model "monai_unet", not of hole_stitcher_unet'),
    "stitcher_run_without_checkpoint": (
        experiment(extra=postprocess('{ run = "stitcher/unfinished" }')),
        10, "postprocess.0.params.run", "has no checkpoints/best.pt yet"),
    "stitcher_run_window_single_voxel": (
        experiment(extra=postprocess('{ run = "stitcher/run1", window = [4, 4, 4] }')),
        10, "postprocess.0.params.window", "window = [4, 4, 4] shrinks to a single voxel"),
    "stitcher_zero_window": (
        experiment(extra=postprocess('{ run = "stitcher/run1", window = [0, 8, 8] }')),
        10, "postprocess.0.params.window", "every side of the window must be at least 1"),
    "stitcher_max_distance_without_near": (
        experiment(extra=postprocess('{ run = "stitcher/run1", max_distance = 2 }')),
        10, "postprocess.0.params", 'max_distance applies only to merge = "near"'),
    # ---- post-processing keys that the chosen mode would silently ignore
    "fill_holes_axis_without_slices": (
        experiment(extra=postprocess("{ axis = 1 }", "fill_holes")),
        10, "postprocess.0.params", 'mode = "3d" ignores axis (axis applies to mode = "slices")'),
    "fill_holes_closing_with_max_hole_voxels": (
        experiment(extra=postprocess('{ mode = "closing", max_hole_voxels = 50 }', "fill_holes")),
        10, "postprocess.0.params", 'mode = "closing" ignores max_hole_voxels'),
    "threshold_connectivity_without_hysteresis": (
        experiment(extra=postprocess("{ value = 0.4, connectivity = 6 }", "threshold")),
        10, "postprocess.0.params", "connectivity applies only to hysteresis (low and high)"),
}

GOOD = {
    "smp_timm_and_mit_encoders": experiment(
        model="smp_unet25d", params='{ encoder = "tu-resnet18", encoder_depth = 4, decoder_attention_type = "scse" }'),
    "smp_mit_encoder_with_unet": experiment(model="smp_unet25d", params='{ encoder = "mit_b0" }'),
    "smp_deprecated_timm_name": experiment(model="smp_unet25d", params='{ encoder = "timm-regnetx_002" }'),
    "unet_batch_norm_batch_of_two": experiment(params='{ norm = "batch" }', window="[16, 16, 16]",
                                               extra="[train]\nbatch_size = 2"),
    "nnunet_external_trainer": experiment(model="nnunet", params='{ trainer = "MyExternalTrainer" }'),
    "nnunet_module_trainer": experiment(
        model="nnunet", params='{ trainer = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer" }'),
    "stitcher_model_and_loss": experiment(
        model="hole_stitcher_unet", params="{ channels = [8, 16, 32] }", window="[4, 4, 8]",
        data='task = "hole_stitching"', extra='[[loss]]\nplugin = "stitch"'),
    "stitcher_steps": experiment(extra="\n".join([
        postprocess('{ run = "stitcher/run1", window = [8, 8, 8], merge = "near", max_distance = 2 }'),
        postprocess('{ run = "not-trained-yet" }'),  # an earlier experiment of the same `vlab run` may train it
        postprocess('{ checkpoint = "stitcher.pt" }'),
        postprocess('{ mode = "slices", axis = 1, max_hole_voxels = 50 }', "fill_holes"),
        postprocess('{ mode = "closing", radius = 2, element = "ball" }', "fill_holes"),
        postprocess("{ low = 0.3, high = 0.6, connectivity = 6 }", "threshold"),
    ])),
}


def make_runs(runs: Path) -> None:
    """Run folders as `vlab train` leaves them, as far as the checks read them (spec.json, best.pt)."""
    stitcher = ("hole_stitcher_unet", {"channels": [4, 8, 16]})
    folders = {"segmenter/run1": ("monai_unet", {}, True), "stitcher/run1": (*stitcher, True),
               "stitcher/unfinished": (*stitcher, False)}
    for name, (plugin, params, finished) in folders.items():
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "spec.json").write_text(json.dumps({"model": {"plugin": plugin, "params": params}}))
        if finished:
            (runs / name / "checkpoints" / "best.pt").write_bytes(b"")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A folder with every case file, a stitcher checkpoint, fake runs and an nnU-Net trainer folder."""
    from vesuvius_lab.plugins.hole_stitching import StitcherNetParams, build_stitcher_network, save_stitcher

    root = tmp_path_factory.mktemp("plugin-checks")
    network = StitcherNetParams(channels=(4, 8, 16))
    save_stitcher(root / "stitcher.pt", build_stitcher_network(network).state_dict(), network, (16, 16, 16))
    (root / "garbage.pt").write_bytes(b"not a checkpoint" * 8)
    make_runs(root / "runs")
    trainers = root / "trainers"
    trainers.mkdir()
    (trainers / "mine.py").write_text("from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n\n\n"
                                      "class MyExternalTrainer(nnUNetTrainer):\n    pass\n")
    for name, (text, *_) in CASES.items():
        (root / f"{name}.toml").write_text(text)
    (root / "good").mkdir()
    for name, text in GOOD.items():
        (root / "good" / f"{name}.toml").write_text(text)
    return {"root": root, "env": {"VLAB_RUNS": str(root / "runs"), "nnUNet_extTrainer": str(trainers)}}


@pytest.fixture(scope="module")
def validated(project) -> subprocess.CompletedProcess:
    """One `vlab validate` of every case file (each reports its own problems)."""
    root = project["root"]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    result = run_cli(["validate", *(f"{name}.toml" for name in CASES)], root, **project["env"])
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written
    return result


def errors_of(result: subprocess.CompletedProcess, file: str) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error ") and f"{file}:" in line]


def test_every_case_fails_cleanly(validated):
    assert validated.returncode == 2, (validated.stdout, validated.stderr)
    assert "Traceback" not in validated.stderr, validated.stderr
    assert f"problem(s) in {len(CASES)} file(s)" in validated.stderr, validated.stderr


@pytest.mark.parametrize("name", CASES)
def test_mistake_is_reported_with_file_line_and_key(name, validated, project):
    _, line, key, text = CASES[name]
    path = project["root"] / f"{name}.toml"
    errors = errors_of(validated, f"{name}.toml")
    assert len(errors) == 1, (errors, validated.stderr)  # exactly the one mistake of this file
    error = errors[0]
    assert error.startswith(f"error {path}:{line}: {key}: "), error
    assert text in error, error


def test_valid_files_using_the_same_features_pass(project, vlab_here):
    """Also every quick experiment: unet25d_stitched.toml names a stitcher run that does not exist yet
    (the demo trains it in the same `vlab run`), so a missing run is left to `vlab train`."""
    root = project["root"]
    empty_runs = root / "no-runs-yet"
    good = sorted((root / "good").glob("*.toml"))
    result = vlab_here(["validate", *map(str, good)], root, **project["env"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(GOOD)
    result = vlab_here(["validate", *map(str, QUICK)], root, **{**project["env"], "VLAB_RUNS": str(empty_runs)})
    assert result.returncode == 0, result.stderr
    assert not empty_runs.exists()


def test_train_refuses_an_unknown_encoder_before_writing_anything(project, tmp_path):
    (tmp_path / "exp.toml").write_text(CASES["smp_unknown_encoder"][0])
    runs = tmp_path / "runs"
    result = run_cli(["train", "exp.toml"], tmp_path, VLAB_RUNS=str(runs))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "exp.toml:7: model.params.encoder:" in result.stderr and 'Did you mean "resnet18"?' in result.stderr
    assert "Traceback" not in result.stderr
    assert not runs.exists() and [p.name for p in tmp_path.iterdir()] == ["exp.toml"]


def test_building_with_an_unknown_encoder_is_a_user_error():
    """The factory says the same when it is reached without validation (e.g. from Python)."""
    from vesuvius_lab.core.errors import UserError
    from vesuvius_lab.core.registry import build

    expected = 'model.params.encoder: "resnet181" is not an encoder .* Did you mean "resnet18"'
    with pytest.raises(UserError, match=expected):
        build("models", "smp_unet25d", {"encoder": "resnet181"}, window=(8, 32, 32))
