"""The winners' training recipe: skeleton targets and losses, start_epoch, deep supervision, EMA,
fine-tuning from a run (train.init) and training on every volume (data.fold = "all")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import copy_run, only_run, tiny_experiment, vlab
from scipy import ndimage

from vesuvius_lab.core import registry
from vesuvius_lab.core.runs import checkpoint
from vesuvius_lab.core.config.spec import LossTerm
from vesuvius_lab.core.data.skeleton import medial_surface, skeleton_target
from vesuvius_lab.core.data.synthetic import generate_volume
from vesuvius_lab.core.runs.folder import Run, effective_state, find_runs
from vesuvius_lab.core.training.objective import build_objective
from vesuvius_lab.core.training.weight_average import WeightAverage

CROSS = ndimage.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------- the medial surface


def _slab(normal_degrees: float, thickness: float, shape=(40, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A plane sheet through the centre, its normal tilted from D towards H; (mask, signed distance)."""
    z, y, _ = np.mgrid[:shape[0], :shape[1], :shape[2]]
    angle = np.radians(normal_degrees)
    distance = (z - shape[0] / 2) * np.cos(angle) + (y - shape[1] / 2) * np.sin(angle)
    return np.abs(distance) <= thickness / 2, distance


@pytest.mark.parametrize("degrees", [0, 10, 25, 45, 70, 90])
@pytest.mark.parametrize("thickness", [3, 5.5])
def test_the_skeleton_of_a_sheet_is_inside_it_one_voxel_thin_and_on_its_middle(degrees, thickness):
    sheet, distance = _slab(degrees, thickness)
    skeleton = medial_surface(sheet)
    assert skeleton.any() and not (skeleton & ~sheet).any()  # inside
    assert not ndimage.binary_erosion(skeleton, CROSS).any()  # no voxel with all 6 neighbours: thin
    # Along the axis closest to the normal, each line through the sheet meets the skeleton at most
    # once, and nearly every line meets it (away from the faces of the volume).
    axis = 0 if degrees <= 45 else 1
    crossings = skeleton.sum(axis)[4:-4, 4:-4]
    inside = np.take(sheet, 0, axis) | np.take(sheet, -1, axis)  # lines where the sheet meets a face
    crossed = (sheet.sum(axis) > 0)[4:-4, 4:-4] & ~inside[4:-4, 4:-4]
    assert crossings.max() == 1 and (crossings[crossed] == 1).mean() > 0.95
    interior = skeleton[4:-4, 4:-4, 4:-4]
    assert np.abs(distance[4:-4, 4:-4, 4:-4][interior]).max() <= 1.0  # the middle, not an edge


def test_the_skeleton_of_a_curved_sheet_follows_its_middle():
    z, y, x = np.mgrid[:24, :64, :64]
    radius = np.sqrt((y - 32.0) ** 2 + (x - 90.0) ** 2)
    shell = np.abs(radius - 45) <= 2
    skeleton = medial_surface(shell)
    assert not (skeleton & ~shell).any() and not ndimage.binary_erosion(skeleton, CROSS).any()
    assert np.abs(radius[skeleton] - 45).max() <= 1.0
    assert skeleton.sum() >= 0.9 * shell.sum() / 5  # about one voxel in five across a 5-voxel shell


def test_the_skeleton_target_of_synthetic_labels_is_thin_inside_the_surface_and_never_ignored():
    _, label = generate_volume((32, 64, 64), np.random.default_rng(3))
    surface = label == 1
    skeleton = medial_surface(surface)
    assert skeleton.any() and not (skeleton & ~surface).any()
    assert not ndimage.binary_erosion(skeleton, CROSS).any()
    target = skeleton_target(label, thicken=1)
    assert target.dtype == np.uint8 and set(np.unique(target)) <= {0, 1}
    assert (target[label != 1] == 0).all() and target.sum() > skeleton.sum()  # thickened, inside the label
    assert skeleton_target(np.zeros((4, 8, 8), np.uint8)).sum() == 0


# --------------------------------------------------------------------------- the losses


def _sheet_batch():
    """Logits of a perfect prediction, the target and a valid mask with an ignored block."""
    sheet, _ = _slab(20, 4, shape=(16, 24, 24))
    target = torch.from_numpy(sheet[None, None].astype(np.float32)).repeat(2, 1, 1, 1, 1)
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[:, :, :, :6] = False  # label 2
    logits = (target * 2 - 1) * 50.0
    return logits, target, valid


@pytest.mark.parametrize("name", ["skeleton_recall", "cldice"])
def test_a_skeleton_loss_is_zero_on_a_perfect_prediction(name):
    loss = registry.build("losses", name, {})
    logits, target, valid = _sheet_batch()
    assert float(loss(logits, target, valid)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(-logits, target, valid)) > 0.5  # and large on the opposite


@pytest.mark.parametrize("name", ["skeleton_recall", "cldice"])
def test_a_skeleton_loss_ignores_label_2_in_value_and_gradient(name):
    loss = registry.build("losses", name, {})
    logits, target, valid = _sheet_batch()
    logits = (logits * 0.02 + torch.randn_like(logits)).requires_grad_()
    value = loss(logits, target, valid)
    value.backward()
    assert logits.grad[~valid].abs().max() == 0 and logits.grad[valid].abs().max() > 0
    # Anything at the ignored voxels (other logits, other labels, even NaN) changes nothing.
    changed_logits = torch.where(valid, logits.detach(), torch.full_like(logits, float("nan")))
    changed_target = torch.where(valid, target, 1 - target)
    assert float(loss(changed_logits, changed_target, valid)) == pytest.approx(float(value.detach()), abs=1e-6)


def test_skeleton_recall_uses_the_loaders_skeleton_when_given():
    loss = registry.build("losses", "skeleton_recall", {})
    logits, target, valid = _sheet_batch()
    label = np.where(valid.numpy(), target.numpy(), 2).astype(np.uint8)
    skeleton = torch.from_numpy(np.stack([skeleton_target(sample[0])[None] for sample in label]))
    probabilities = torch.rand_like(logits)
    logits = torch.logit(probabilities, eps=1e-4)
    assert float(loss(logits, target, valid, skeleton=skeleton)) == pytest.approx(float(loss(logits, target, valid)))
    on = (skeleton.bool() & valid & (target > 0)).float()
    expected = 1 - ((torch.sigmoid(logits) * on).sum() + 1) / (on.sum() + 1)
    assert float(loss(logits, target, valid, skeleton=skeleton)) == pytest.approx(float(expected), rel=1e-5)


def test_a_term_with_start_epoch_is_logged_but_does_not_steer_before_it():
    objective = build_objective([LossTerm(plugin="bce"), LossTerm(plugin="skeleton_recall", start_epoch=2)])
    alone = build_objective([LossTerm(plugin="bce")])
    logits, target, valid = _sheet_batch()
    logits = (logits * 0.01).requires_grad_()
    for epoch, steers in ((0, False), (1, False), (2, True), (5, True)):
        total, terms = objective(logits, target, valid, epoch=epoch)
        reference, _ = alone(logits, target, valid)
        assert set(terms) == {"bce", "skeleton_recall"}
        assert (float(total.detach()) != pytest.approx(float(reference.detach()))) == steers


def test_deep_supervision_heads_are_weighted_and_the_main_head_is_logged():
    objective = build_objective([LossTerm(plugin="dice"), LossTerm(plugin="bce")])
    logits, target, valid = _sheet_batch()
    heads = [logits * 0.01, -logits * 0.01, torch.zeros_like(logits)]
    weights = [4 / 7, 2 / 7, 1 / 7]
    total, terms = objective(heads, target, valid, head_weights=weights)
    each = [objective(head, target, valid)[0] for head in heads]
    assert float(total) == pytest.approx(sum(w * float(v) for w, v in zip(weights, each)), rel=1e-6)
    assert terms == objective(heads[0], target, valid)[1]
    with pytest.raises(ValueError, match="3 deep-supervision outputs but 2 weights"):
        objective(heads, target, valid, head_weights=[0.5, 0.5])


def test_training_with_skeleton_recall_gets_its_targets_from_the_loader_workers(synth_data, tmp_path):
    text = tiny_experiment("skeletal", iterations=3).replace("workers = 0", "workers = 1")
    text += '\n[[loss]]\nplugin = "bce"\n\n[[loss]]\nplugin = "skeleton_recall"\nstart_epoch = 1\n'
    (tmp_path / "skeletal.toml").write_text(text)
    result = vlab(["train", str(tmp_path / "skeletal.toml")], synth_data, tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    terms = only_run(tmp_path / "runs").metrics()[0]["loss_terms"]
    assert set(terms) == {"bce", "skeleton_recall"} and 0 < terms["skeleton_recall"] <= 1


def test_the_patch_stream_yields_the_cached_skeleton_of_each_label_moved_with_it():
    from vesuvius_lab.core.config.spec import Augment
    from vesuvius_lab.core.data.sampling import SKELETON_TARGETS, PatchSource, PatchStream

    image, label = generate_volume((32, 64, 64), np.random.default_rng(5))
    volume_skeleton = SKELETON_TARGETS.make(label)
    np.testing.assert_array_equal(volume_skeleton, skeleton_target(label))
    source = PatchSource.from_arrays(image, label, np.random.default_rng(0), skeleton=volume_skeleton)
    stream = PatchStream([source], (16, 32, 32), foreground_share=1.0, switches=Augment(), seed=0, skeleton=True)
    found = 0
    for _, (patch_image, targets) in zip(range(12), stream):
        assert targets.shape == (2, 16, 32, 32) and patch_image.shape == (1, 16, 32, 32)
        patch_label, skeleton = targets.numpy()
        assert not (skeleton.astype(bool) & (patch_label != 1)).any()  # inside the surface, after any resampling
        found += skeleton.any()
    assert found >= 10  # the patches are centred on sheets, and their skeletons came along


# --------------------------------------------------------------------------- EMA


def test_the_weight_average_moves_towards_the_weights_with_a_warm_up():
    model = torch.nn.Linear(3, 1)
    average = WeightAverage(model, 0.9)
    start = average.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)  # first decay: min(0.9, 1/10) = 0.1
    assert torch.allclose(average.model.weight, start + 0.9)
    assert not average.model.weight.requires_grad and average.current_decay() == pytest.approx(2 / 11)


def test_ema_weights_differ_from_the_raw_ones_and_are_what_validation_used(synth_data, tmp_path, vlab_here):
    file = tmp_path / "ema.toml"
    file.write_text(tiny_experiment("ema", iterations=4).replace("[train]\n", "[train]\nema = 0.9\n"))
    result = vlab(["train", str(file)], synth_data, tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    run = only_run(tmp_path / "runs")
    state = checkpoint.load(run.checkpoints / "best.pt")
    assert state["ema_updates"] == 4
    differ = [name for name, value in state["model"].items()
              if value.dtype.is_floating_point and not torch.equal(value, state["raw_model"][name])]
    assert differ
    # Scoring the run's prediction again (which loads "model", the average) reproduces the validation score.
    evaluated = vlab_here(["predict", str(run.path), "--input", str(synth_data / "train_images"), "--output",
                           str(tmp_path / "pred")], VLAB_DATA=str(synth_data), VLAB_RUNS=str(tmp_path / "runs"))
    assert evaluated.returncode == 0, evaluated.stderr
    scored = vlab_here(["evaluate", str(tmp_path / "pred"), str(synth_data / "train_labels")])
    assert scored.returncode == 0, scored.stderr
    recorded = {v["id"]: v["score"] for v in run.read("scores.json")["volumes"]}
    for volume_id, score in recorded.items():
        assert f"{score:.4f}" in scored.stdout, (volume_id, scored.stdout)


# --------------------------------------------------------------------------- init and fold "all"


def test_init_from_a_run_with_another_window_trains_and_is_recorded(tiny_run, synth_data, tmp_path, vlab_here):
    runs = tmp_path / "runs"
    first = copy_run(Run(tiny_run), runs)  # a finished run of tiny_experiment(), window 8x32x32
    larger = '\n[data]\nwindow = [8, 48, 48]\n'.join(tiny_experiment("second").split("\n[data]\nwindow = [8, 32, 32]\n"))
    larger = larger.replace("[train]\n", f'[train]\ninit = "{first.experiment}/{first.id}"\n')
    (tmp_path / "second.toml").write_text(larger)
    result = vlab(["train", str(tmp_path / "second.toml")], synth_data, runs)
    assert result.returncode == 0, result.stderr
    (second,) = [r for r in find_runs(runs) if r.experiment == "second"]
    assert f"initial weights from {first.path / 'checkpoints' / 'best.pt'}" in second.path.joinpath("log.txt").read_text()
    assert second.read("summary.json")["init"] == f"{first.experiment}/{first.id}"
    board = vlab_here(["leaderboard"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert f"(from {first.experiment}/{first.id})" in " ".join(board.stdout.split()) or "(from" in board.stdout


def test_init_from_weights_of_another_model_is_refused_before_a_run_exists(tiny_run, synth_data, tmp_path,
                                                                            vlab_here):
    runs = tmp_path / "runs"
    first = copy_run(Run(tiny_run), runs)  # a finished run of tiny_experiment()
    other = tiny_experiment("other").replace("decoder_channels = [16, 8, 8]", "decoder_channels = [16, 8, 4]")
    (tmp_path / "other.toml").write_text(other.replace("[train]\n", f'[train]\ninit = "{first.path}"\n'))
    result = vlab_here(["train", str(tmp_path / "other.toml")], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert result.returncode == 2
    assert "do not fit this model" in result.stderr and "layers of another shape" in result.stderr
    assert "decoder" in result.stderr
    assert find_runs(runs) == [first]
    missing = tiny_experiment("third").replace("[train]\n", '[train]\ninit = "nowhere/run"\n')
    (tmp_path / "third.toml").write_text(missing)
    result = vlab_here(["train", str(tmp_path / "third.toml")], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert result.returncode == 2 and "neither a run directory" in result.stderr


def test_fold_all_trains_on_every_volume_and_refuses_validation(synth_data, tmp_path, vlab_here):
    runs = tmp_path / "runs"
    file = tmp_path / "everything.toml"
    file.write_text(tiny_experiment("everything").replace("folds = 3", 'folds = 3\nfold = "all"'))
    result = vlab(["train", str(file)], synth_data, runs)
    assert result.returncode == 0, result.stderr
    run = only_run(runs)
    assert run.id.startswith("foldall-") and effective_state(run) == "finished"
    assert "score" not in run.read("summary.json") and run.read("summary.json")["validated"] is False
    assert run.metrics()[-1].get("val") is None and (run.checkpoints / "best.pt").is_file()
    board = vlab_here(["leaderboard"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert "not validated" in board.stdout
    tuned = vlab_here(["tune", str(file), "--trials", "2"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert tuned.returncode == 2 and "trained on every volume" in tuned.stderr
    predicted = vlab_here(["predict", str(run.path), "--input", str(synth_data / "test_images"), "--output",
                           str(tmp_path / "pred")], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert predicted.returncode == 0, predicted.stderr
