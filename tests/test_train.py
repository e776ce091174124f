"""Training end to end on tiny synthetic data: records, validation, resume after SIGKILL and Ctrl-C,
non-finite losses, DDP on the CPU and its gradient equivalence."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import KILLED, copy_run, experiment, only_run, start_vlab, vlab, wait_for_epochs

from vesuvius_lab.core.runs import checkpoint
from vesuvius_lab.core.runs.folder import Run, effective_state, find_runs


def test_train_records_scores_and_checkpoints(synth_data, tmp_path):
    result = vlab(["train", str(experiment(tmp_path))], synth_data, tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    run = only_run(tmp_path / "runs")
    assert run.experiment == "tiny" and effective_state(run) == "finished"
    metrics = run.metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[0]["loss_terms"]) == {"dice", "bce"} and metrics[0]["samples_per_s"] > 0
    assert metrics[1]["lr"] < metrics[0]["lr"]  # poly schedule
    summary = run.read("summary.json")
    for key in ("score", "topo_score", "surface_dice", "voi_score"):
        assert 0 <= summary[key] <= 1
    assert summary["steps"]["threshold"] == pytest.approx(summary["score"])
    scores = run.read("scores.json")
    assert {v["id"] for v in scores["volumes"]} and all("betti" in v for v in scores["volumes"])
    spec = run.read("spec.json")
    assert spec["train"]["seed"] == 0 and Path(spec["data"]["root"]) == synth_data  # resolved
    env = run.read("env.json")
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"]
    assert env["world_size"] == 1 and env["device"] == "cpu"
    for name in ("best", "last"):
        state = checkpoint.load(run.checkpoints / f"{name}.pt")
        assert state["model_plugin"] == "smp_unet25d"
    assert "score" in result.stdout


def test_sigkill_mid_epoch_then_resume_finishes(killed_run, synth_data, tmp_path):
    runs = tmp_path / "runs"
    run = copy_run(killed_run, runs)  # `vlab train` got SIGKILL once epoch 1 was recorded and epoch 2 had begun
    assert effective_state(run) == "killed"
    epochs_before = len(run.metrics())
    assert epochs_before < 3
    resumed = vlab(["train", "--resume", str(run.path)], synth_data, runs)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    assert [m["epoch"] for m in run.metrics()] == list(range(1, 4))
    assert effective_state(run) == "finished" and "score" in run.read("summary.json")


def test_vlab_run_resumes_a_killed_run_of_the_same_spec(killed_run, synth_data, tmp_path, vlab_here):
    runs = tmp_path / "runs"
    tiny = experiment(tmp_path, **KILLED)  # the experiment the killed run was started from
    run = copy_run(killed_run, runs)
    assert effective_state(run) == "killed"
    again = vlab(["run", str(tiny)], synth_data, runs)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run.path}" in " ".join(again.stderr.split()) and "1 resumed" in again.stderr
    assert find_runs(runs) == [run]                                 # the same run, no new one
    assert [m["epoch"] for m in run.metrics()] == [1, 2, 3]         # epoch 1 kept, not trained again
    assert effective_state(run) == "finished"
    fresh = vlab_here(["run", str(tiny), "--force"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert fresh.returncode == 0 and len(find_runs(runs)) == 2      # --force starts a new run


def _as_a_background_job() -> None:
    """What a shell does to a job started with `&`: SIGINT ignored, so Python raises no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("started", ["from a terminal", "as a background job"])
def test_ctrl_c_saves_and_exits_cleanly(started, synth_data, tmp_path):
    """The trainer handles SIGINT itself, whatever disposition the process inherited."""
    runs = tmp_path / "runs"
    setup = _as_a_background_job if started == "as a background job" else None
    process = start_vlab(["train", str(experiment(tmp_path, epochs=3, iterations=8))], synth_data, runs,
                         preexec_fn=setup)
    run = wait_for_epochs(runs, 1, process)
    process.send_signal(signal.SIGINT)  # epoch 1 is recorded; epoch 2 has just begun
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "vlab train --resume" in stderr and "Traceback" not in stderr
    assert effective_state(run) == "interrupted" and run.read("status.json")["signal"] == "SIGINT"
    assert checkpoint.load(run.checkpoints / "last.pt")["epoch"] >= 0


def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(tiny_run, synth_data, tmp_path):
    runs = tmp_path / "runs"
    run = copy_run(Run(tiny_run), runs)  # a finished run of one epoch
    assert effective_state(run) == "finished" and run.read("spec.json")["train"]["epochs"] == 1
    before = (run.checkpoints / "last.pt").read_bytes()
    # An infinite weight makes the summed loss inf on the first batch of the resumed epoch.
    spec = run.read("spec.json")
    spec["train"]["epochs"] = 2
    spec["loss"][0]["weight"] = 1e308
    spec["loss"][1]["weight"] = 1e308
    run.write("spec.json", spec)
    result = vlab(["train", "--resume", str(run.path)], synth_data, runs)
    assert result.returncode == 2
    assert "The loss became inf" in result.stderr and "Traceback" not in result.stderr
    assert (run.checkpoints / "last.pt").read_bytes() == before
    assert effective_state(run) == "failed"


# --------------------------------------------------------------------------- gradient equivalence


def _model_and_batch():
    from vesuvius_lab.core import registry

    torch.manual_seed(0)
    model = registry.build("models", "monai_unet", {"channels": [4, 8], "strides": [2], "num_res_units": 0},
                           window=(8, 16, 16), in_channels=1, out_channels=1)
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(4, 1, 8, 16, 16, generator=generator)
    label = (torch.rand(4, 1, 8, 16, 16, generator=generator) > 0.7).float()
    return model, image, label


def _ddp_gradients(rank: int, world_size: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from vesuvius_lab.core.config.spec import LossTerm
    from vesuvius_lab.core.training import distributed
    from vesuvius_lab.core.training.objective import build_objective

    distributed.init(rank, world_size, "cpu", port)
    model, image, label = _model_and_batch()
    ddp = DistributedDataParallel(model)
    half = image.shape[0] // world_size
    rows = slice(rank * half, (rank + 1) * half)
    objective = build_objective([LossTerm(plugin="bce")])
    loss, _ = objective(ddp(image[rows]), label[rows], torch.ones_like(label[rows], dtype=torch.bool))
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    distributed.shutdown(together=True)


def test_gradient_of_two_ranks_with_batch_b_equals_one_rank_with_batch_2b(tmp_path):
    from vesuvius_lab.core.config.spec import LossTerm
    from vesuvius_lab.core.training import distributed
    from vesuvius_lab.core.training.objective import build_objective

    out = tmp_path / "grads.pt"
    distributed.spawn(_ddp_gradients, 2, str(out))
    ddp_grads = torch.load(out, weights_only=True)
    model, image, label = _model_and_batch()
    loss, _ = build_objective([LossTerm(plugin="bce")])(model(image), label, torch.ones_like(label, dtype=torch.bool))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert torch.allclose(ddp_grads[name], parameter.grad, rtol=1e-4, atol=1e-6), name


def stitcher_experiment(tmp_path: Path, *, window: int, channels: list[int], holes: list[int], radius: list[int],
                        epochs: int, iterations: int, batch_size: int) -> Path:
    """A hole-stitching experiment named "stitcher" (cubic windows, default stitch loss, lr 5e-3)."""
    path = tmp_path / "stitcher.toml"
    path.write_text(textwrap.dedent(f"""
        name = "stitcher"
        postprocess = []
        [data]
        task = "hole_stitching"
        window = {[window] * 3}
        folds = 3
        foreground_oversample = 1.0
        corruption = {{ holes = {holes}, radius = {radius} }}
        [model]
        plugin = "hole_stitcher_unet"
        params = {{ channels = {channels} }}
        [[loss]]
        plugin = "stitch"
        [train]
        epochs = {epochs}
        iterations_per_epoch = {iterations}
        batch_size = {batch_size}
        lr = 5e-3
        workers = 0
        [inference]
        window = {[window] * 3}
    """))
    return path


#: Enough steps for the stitcher to win back a clear share of what the damage costs on held-out volumes.
STITCHER_ITERATIONS = 125


@pytest.fixture(scope="module")
def stitcher_run(synth_data, tmp_path_factory) -> Run:
    """A stitcher trained by `vlab train` on the hole-stitching task: the quick stitcher's recipe, shortened
    to one epoch. Shared by the tests below: copy it before changing anything."""
    root = tmp_path_factory.mktemp("stitcher")
    stitcher = stitcher_experiment(root, window=32, channels=[8, 16, 32], holes=[2, 5], radius=[2, 4],
                                   epochs=1, iterations=STITCHER_ITERATIONS, batch_size=4)
    result = vlab(["train", str(stitcher)], synth_data, root / "runs")
    assert result.returncode == 0, result.stderr
    return only_run(root / "runs")


def test_a_stitcher_trained_by_vlab_train_repairs_held_out_volumes(stitcher_run):
    """On the validation fold (volumes it never saw, holes punched as densely as in training) the merged
    result must beat the damaged input."""
    summary = stitcher_run.read("summary.json")
    steps = summary["steps"]
    print(steps)
    assert list(steps) == ["input", "threshold", "merged"] and summary["score"] == steps["merged"]
    assert steps["input"] < 0.97                                   # the damage costs score...
    assert steps["merged"] > steps["input"] + 0.005                # ...and the stitcher wins some back


def test_hole_stitching_task_trains_and_serves_as_a_post_processing_step(stitcher_run, synth_data, tmp_path,
                                                                         vlab_here):
    runs = tmp_path / "runs"
    copy_run(stitcher_run, runs)
    steps = stitcher_run.read("summary.json")["steps"]
    assert list(steps) == ["input", "threshold", "merged"]  # the damaged input and the merged result too
    segmenter = experiment(tmp_path, epochs=1, iterations=1)
    segmenter.write_text(segmenter.read_text() + textwrap.dedent("""
        [[postprocess]]
        plugin = "hole_stitching_unet"
        params = { run = "stitcher", window = [16, 16, 16] }
    """))
    result = vlab_here(["train", str(segmenter)], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert result.returncode == 0, result.stderr
    (run,) = [r for r in find_runs(runs) if r.experiment == "tiny"]
    assert set(run.read("summary.json")["steps"]) == {"threshold", "hole_stitching_unet"}


def test_a_missing_stitcher_run_fails_before_training(synth_data, tmp_path, vlab_here):
    segmenter = experiment(tmp_path, epochs=1, iterations=1)
    segmenter.write_text(segmenter.read_text() + '[[postprocess]]\nplugin = "hole_stitching_unet"\n'
                                                  'params = { run = "no-such-stitcher" }\n')
    result = vlab_here(["train", str(segmenter)], VLAB_DATA=str(synth_data), VLAB_RUNS=str(tmp_path / "runs"))
    assert result.returncode == 2 and "no-such-stitcher" in result.stderr and "Traceback" not in result.stderr
    assert find_runs(tmp_path / "runs") == []
