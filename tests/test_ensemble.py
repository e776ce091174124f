"""Ensembles of runs: out-of-fold scoring and records, the combine arithmetic on the cached member
probabilities, the cache (re-weighting predicts nothing again), refused members, and a submission."""

from __future__ import annotations

import io
import shutil
import textwrap
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from vesuvius_lab.cli import main as vlab
from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.config.project import Project, load_project
from vesuvius_lab.core.config.spec import EnsembleSpec, Experiment
from vesuvius_lab.core.data.dataset import Dataset
from vesuvius_lab.core.data.tiff import read_volume
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.ensemble import EnsemblePredictor, combine
from vesuvius_lab.core.training.ensemble_run import build_ensemble
from vesuvius_lab.core.inference.ensemble_members import members_from_record, resolve_members
from vesuvius_lab.core.data.array_cache import checksum_path, entry_problem, probabilities_problem, write_array
from vesuvius_lab.core.inference.probability_cache import CachedRun, check_output, volume_key
from vesuvius_lab.core.inference.run_kinds import load_run
from vesuvius_lab.core.metric.score import score_volume
from vesuvius_lab.core.runs.folder import Run

REPO = Path(__file__).resolve().parents[1]

COMMON = """
    [data]
    window = [8, 32, 32]
    [train]
    epochs = 1
    iterations_per_epoch = 2
    batch_size = 2
    [inference]
    overlap = 0.25
    batch_size = 8
"""
SMP = 'name = "tiny-smp"\n[model]\nplugin = "smp_unet25d"\n' \
      'params = { encoder = "resnet18", encoder_depth = 3, decoder_channels = [16, 8, 8] }\n'
MONAI = 'name = "tiny-monai"\n[model]\nplugin = "monai_unet"\n' \
        'params = { channels = [4, 8], strides = [2], num_res_units = 0 }\n'
ENSEMBLE = """
    name = "{name}"
    [ensemble]
    members = {members}
    {extra}
    [inference]
    threshold = 0.5
    [[postprocess]]
    plugin = "remove_small_components"
    params = {{ min_voxels = 5 }}
"""


@dataclass
class Workspace:
    root: Path
    project: Project
    smp: list[Run]  # folds 0 and 1
    monai: Run  # fold 0 only

    @property
    def runs(self) -> Path:
        return self.project.runs_dir

    @property
    def data(self) -> Path:
        return self.project.data_root

    def ensemble_file(self, name: str, members: str, extra: str = "") -> Path:
        path = self.root / f"{name}.toml"
        path.write_text(textwrap.dedent(ENSEMBLE.format(name=name, members=members, extra=extra)))
        return path


def write_project(root: Path, data: Path, runs: Path) -> Path:
    path = root / "vesuvius.toml"
    path.write_text(f'data_root = "{data}"\nruns_dir = "{runs}"\ndevice = "cpu"\nworkers = 0\nfolds = 2\n')
    return path


@pytest.fixture(scope="module")
def ws(synth_data, tmp_path_factory) -> Workspace:
    """Three tiny runs of two model families: the 2.5D SMP UNet on both folds, the MONAI UNet on fold 0."""
    from vesuvius_lab.core.training.trainer import train

    root = tmp_path_factory.mktemp("ensemble")
    shutil.copytree(synth_data, root / "data")
    project = load_project(write_project(root, root / "data", root / "runs"))
    (root / "smp.toml").write_text(SMP + textwrap.dedent(COMMON))
    (root / "monai.toml").write_text(MONAI + textwrap.dedent(COMMON))
    with pytest.MonkeyPatch.context() as env:
        env.delenv("VLAB_DATA", raising=False)
        env.delenv("VLAB_RUNS", raising=False)
        smp = [train(load_experiment(root / "smp.toml", [f"data.fold={k}"]), project) for k in (0, 1)]
        monai = train(load_experiment(root / "monai.toml"), project)
    return Workspace(root, project, smp, monai)


def cache_files(runs: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in runs.glob("*/*/probabilities/*/*.npy")}


def cached(run: Run, volume: np.ndarray) -> np.ndarray:
    """A member run's cached float16 probabilities of a volume, as float32."""
    spec = Experiment.model_validate(run.read("spec.json"))
    return np.load(CachedRun(run, spec).path(volume_key(volume))).astype(np.float32)


def image(ws: Workspace, volume_id: str) -> np.ndarray:
    return read_volume(Dataset.open(ws.data).image_path(volume_id))


# --------------------------------------------------------------------------- the spec


def test_an_experiment_has_either_a_model_or_an_ensemble(tmp_path):
    neither = tmp_path / "neither.toml"
    neither.write_text('name = "x"\n')
    both = tmp_path / "both.toml"
    both.write_text('name = "x"\nextends = "%s"\n[ensemble]\nmembers = ["a/b"]\n' % (REPO / "experiments/base.toml"))
    weights = tmp_path / "weights.toml"
    weights.write_text('name = "x"\n[ensemble]\nmembers = ["a/b", {experiment = "c"}]\nweights = [1]\n'
                       'combine = "weighted"\n')
    for path, expected in ((neither, "[model] table"), (both, "not both"), (weights, "1 values for 2 members")):
        with pytest.raises(SpecError) as caught:
            load_experiment(path)
        assert expected in str(caught.value) and str(path) in str(caught.value)

    quick = load_experiment(REPO / "experiments/quick/ensemble.toml").spec
    assert quick.model is None and quick.ensemble.combine == "mean"
    assert quick.model_label == "ensemble(quick-unet25d+quick-monai-unet)"
    names = {load_experiment(REPO / "experiments/quick" / f).spec.name for f in ("unet25d.toml", "monai_unet.toml")}
    assert {m.experiment for m in quick.ensemble.members} == names


def test_vlab_train_refuses_an_ensemble_file(tmp_path, capsys):
    path = tmp_path / "refused.toml"
    path.write_text('name = "refused"\n[ensemble]\nmembers = ["tiny-monai/x"]\n')
    with pytest.raises(SystemExit) as caught:
        vlab(["train", str(path)])
    assert caught.value.code == 2
    assert "vlab ensemble" in capsys.readouterr().err


# --------------------------------------------------------------------------- members


def test_members_that_do_not_exist_or_are_unfinished_are_refused(ws):
    def resolve(members: str):
        spec = EnsembleSpec.model_validate({"members": tomllib.loads(f"m = {members}")["m"]})
        return resolve_members(spec, ws.runs, ws.data)

    with pytest.raises(UserError, match='no runs of this experiment.*Did you mean "tiny-smp"'):
        resolve('[{ experiment = "tiny-smq" }]')
    with pytest.raises(UserError, match=r"no finished run for fold\(s\) 1 \(no run\).*folds = \[0\]"):
        resolve('[{ experiment = "tiny-monai", folds = "all" }]')
    with pytest.raises(UserError, match="not a run directory"):
        resolve('["tiny-monai/no-such-run"]')
    unfinished = ws.runs / "copied" / ws.monai.id
    shutil.copytree(ws.monai.path, unfinished)
    Run(unfinished).set_status("failed", error="boom")
    with pytest.raises(UserError, match="is failed, not finished"):
        resolve(f'["{unfinished}"]')
    shutil.rmtree(unfinished.parent)

    (smp,) = resolve('[{ experiment = "tiny-smp", folds = "all" }]')
    assert [r.run.path for r in smp.runs] == [r.path for r in ws.smp]
    assert smp.runs[0].holds_out.isdisjoint(smp.runs[1].holds_out)
    assert smp.runs[0].holds_out | smp.runs[1].holds_out == set(Dataset.open(ws.data).ids)


# --------------------------------------------------------------------------- building, caching, arithmetic


@pytest.fixture(scope="module")
def builds(ws) -> dict:
    """A one-member ensemble, then the same member plus a cross-validated one, then re-weighted."""
    out = {}
    monai = f'["{ws.monai.experiment}/{ws.monai.id}"]'
    both = '[{ experiment = "tiny-smp", folds = "all" }, "%s/%s"]' % (ws.monai.experiment, ws.monai.id)
    out["one"] = build_ensemble(load_experiment(ws.ensemble_file("ens-one", monai)), ws.project)
    out["after_one"] = cache_files(ws.runs)
    out["mean"] = build_ensemble(load_experiment(ws.ensemble_file("ens-mean", both)), ws.project)
    out["after_mean"] = cache_files(ws.runs)
    weighted = ws.ensemble_file("ens-weighted", both, 'combine = "weighted"\nweights = [3, 1]')
    out["weighted"] = build_ensemble(load_experiment(weighted), ws.project)
    out["after_weighted"] = cache_files(ws.runs)
    return out


def test_ensemble_is_scored_out_of_fold_and_recorded_like_a_run(ws, builds):
    run = builds["mean"]
    assert run.read("status.json")["state"] == "finished"
    summary = run.read("summary.json")
    assert set(summary) == set(ws.monai.read("summary.json"))  # the keys the leaderboard reads
    assert summary["experiment"] == "ens-mean" and 0 <= summary["score"] <= 1
    assert run.read("spec.json")["ensemble"]["combine"] == "mean"
    scores = run.read("scores.json")
    # The MONAI run holds out fold 0 only, so that fold is what every member holds out.
    fold0 = sorted(ws.smp[0].read("scores.json")["volumes"], key=lambda v: v["id"])
    assert sorted(v["id"] for v in scores["volumes"]) == [v["id"] for v in fold0]
    assert list(scores["steps"]) == ["threshold", "remove_small_components"]
    assert summary["score"] == pytest.approx(scores["steps"]["remove_small_components"])

    # Out-of-fold: the SMP fold-1 run trained on fold 0, so it predicted nothing for the ensemble.
    assert not list((ws.smp[1].path / "probabilities").glob("*/*.npy"))
    assert len(list((ws.smp[0].path / "probabilities").glob("*/*.npy"))) == len(fold0)


def test_each_volume_score_is_that_of_the_mean_of_the_cached_member_arrays(ws, builds):
    run = builds["mean"]
    predictor = load_run(run.path)
    assert predictor.kind == "ensemble"
    labels = Dataset.open(ws.data)
    for entry in run.read("scores.json")["volumes"]:
        volume = image(ws, entry["id"])
        expected = (cached(ws.smp[0], volume) + cached(ws.monai, volume)) / 2
        combined = predictor.probabilities(volume)  # a scored volume: predicted out-of-fold again
        np.testing.assert_allclose(combined, expected, rtol=0, atol=1e-6)
        label = read_volume(labels.label_path(entry["id"]))
        assert score_volume(predictor.chain.apply(expected), label).score == pytest.approx(entry["score"])


def test_combine_modes_on_the_cached_probabilities(ws, builds):
    record = builds["weighted"].read("members.json")
    members = members_from_record(record["members"], ws.runs, builds["weighted"])
    volume_id = next(iter(record["volumes"]))
    volume = image(ws, volume_id)
    a, b = cached(ws.smp[0], volume), cached(ws.monai, volume)

    def logit(p):
        p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    expected = {"weighted": (3 * a + b) / 4, "logit_mean": 1 / (1 + np.exp(-(3 * logit(a) + logit(b)) / 4))}
    for mode, want in expected.items():
        predictor = EnsemblePredictor(members, mode)
        got = predictor.probabilities(volume, volume_id)
        assert got.dtype == np.float32 and got.shape == volume.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
        assert predictor.predictions == 0  # all from the cache
    assert not np.allclose(expected["weighted"], expected["logit_mean"], atol=1e-3)  # the modes differ

    # Test volumes: a member of several folds is the average of its fold runs.
    np.testing.assert_allclose(combine([(0.5, a), (0.5, b)], "mean"), (a + b) / 2, rtol=0, atol=1e-6)


def test_the_cache_spares_predictions_when_members_are_added_or_reweighted(ws, builds):
    one, after_mean = builds["after_one"], builds["after_mean"]
    assert one and all(p.is_relative_to(ws.monai.path) for p in one)
    # Adding the SMP member predicted its volumes only: the MONAI member's files are untouched.
    assert {p: t for p, t in after_mean.items() if p in one} == one
    assert set(after_mean) - set(one) and all(p.is_relative_to(ws.smp[0].path) for p in set(after_mean) - set(one))
    # Re-weighting predicted nothing at all.
    assert builds["after_weighted"] == after_mean
    assert builds["weighted"].read("status.json")["state"] == "finished"


def test_a_change_of_inference_settings_predicts_again(ws, builds):
    spec = Experiment.model_validate(ws.monai.read("spec.json"))
    plain, flipped = CachedRun(ws.monai, spec), CachedRun(ws.monai, spec, overrides={"tta": ["flip1"]})
    assert plain.folder != flipped.folder
    assert CachedRun(ws.monai, spec, overrides={"threshold": 0.3}).folder == plain.folder


def test_leaderboard_ranks_the_ensemble_beside_its_members(ws, builds):
    from vesuvius_lab.core.reports.leaderboard import build_leaderboard

    board = build_leaderboard(ws.runs)
    rows = {row.experiment: row for row in board.rows}
    assert {"tiny-smp", "tiny-monai", "ens-mean"} <= set(rows)
    assert rows["ens-mean"].plugins["model"] == "ensemble(tiny-smp+tiny-monai)"
    assert rows["ens-mean"].stats["score"].mean == pytest.approx(builds["mean"].read("summary.json")["score"])
    assert not [n for n in board.notices if n.experiment.startswith("ens-")]


# --------------------------------------------------------------------------- refusals and the submission


@pytest.mark.parametrize("damage", ["another shape", "same size, other values", "NaN with a valid checksum",
                                    "no checksum"])
def test_a_damaged_cache_entry_is_predicted_again_not_trusted(damage, ws, builds, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(ws.runs, runs)
    project = write_project(tmp_path, ws.data, runs)
    monai = Run(runs / ws.monai.experiment / ws.monai.id)
    volume_id = next(iter(builds["mean"].read("members.json")["volumes"]))
    spec = Experiment.model_validate(monai.read("spec.json"))
    volume = image(ws, volume_id)
    path = CachedRun(monai, spec).path(volume_key(volume))
    good = np.load(path)
    assert entry_problem(path) is None  # the build left a sound, checksummed entry
    if damage == "another shape":
        np.save(path, np.zeros((4, 4, 4), np.float16))
    elif damage == "same size, other values":
        np.save(path, np.clip(good.astype(np.float32) + 0.25, 0, 1).astype(np.float16))
    elif damage == "NaN with a valid checksum":
        write_array(path, np.full(good.shape, np.nan, np.float16))
    else:
        checksum_path(path).unlink()
    assert entry_problem(path, probabilities_problem) not in (None, "absent")

    file = ws.ensemble_file("ens-repaired", f'["{monai.path}"]')
    vlab(["--project", str(project), "ensemble", str(file)])
    assert "Traceback" not in capsys.readouterr().err
    (built,) = list((runs / "ens-repaired").iterdir())
    assert Run(built).read("status.json")["state"] == "finished"
    assert entry_problem(path) is None
    np.testing.assert_array_equal(np.load(path), good)  # predicted again: the same probabilities


def test_a_member_that_predicts_another_shape_or_nan_is_refused():
    what, fix = "member m predicted volume v", "A member must return one surface probability per voxel."
    with pytest.raises(UserError, match=r"shape \(4, 4, 4\)"):
        check_output(np.zeros((4, 4, 4), np.float32), (8, 8, 8), what, fix)
    with pytest.raises(UserError, match="NaN"):
        check_output(np.full((8, 8, 8), np.nan, np.float32), (8, 8, 8), what, fix)
    with pytest.raises(UserError, match=r"outside \[0, 1\]"):
        check_output(np.full((8, 8, 8), 3.0, np.float32), (8, 8, 8), what, fix)
    check_output(np.full((8, 8, 8), 0.5, np.float32), (8, 8, 8), what, fix)


def test_submit_of_an_ensemble_run_writes_a_valid_zip(ws, builds, tmp_path):
    target = tmp_path / "submission.zip"
    vlab(["--project", str(ws.root / "vesuvius.toml"), "submit", str(builds["weighted"].path),
          "--input", str(ws.data / "test_images"), "--output", str(target)])
    dataset = Dataset.open(ws.data)
    with zipfile.ZipFile(target) as archive:
        assert sorted(archive.namelist()) == sorted(f"{i}.tif" for i in dataset.test_ids)
        for volume_id in dataset.test_ids:
            mask = tifffile.imread(io.BytesIO(archive.read(f"{volume_id}.tif")))
            assert mask.dtype == np.uint8 and mask.shape == read_volume(dataset.image_path(volume_id, "test")).shape
            assert set(np.unique(mask)) <= {0, 1}
    # Test volumes are held out by no run, so every fold of the SMP member predicted them.
    for run in (*ws.smp, ws.monai):
        keys = {p.stem for p in (run.path / "probabilities").glob("*/*.npy")}
        assert {volume_key(read_volume(dataset.image_path(i, "test"))) for i in dataset.test_ids} <= keys


def test_an_ensemble_of_2_5d_and_3d_runs_predicts_blocks_as_it_predicts_the_whole_volume(ws, builds):
    """Block-wise prediction of a large volume: each member run's blocks, combined as the ensemble combines."""
    from vesuvius_lab.core.inference.blocks import ArrayReader, BlockPlan, Box

    predictor = load_run(builds["weighted"].path)
    volume = read_volume(sorted((ws.data / "test_images").glob("*.tif"))[0])
    smp = [load_run(run.path).probabilities(volume) for run in ws.smp]  # float32 sliding windows of each run
    whole = (3 * (smp[0] + smp[1]) / 2 + load_run(ws.monai.path).probabilities(volume)) / 4  # weights [3, 1]
    blocks = np.full(volume.shape, np.nan, np.float32)
    for block in BlockPlan(volume.shape, Box.of_shape(volume.shape), (16, 32, 24)).blocks():
        blocks[block.core.slices] = predictor.blocks(ArrayReader(volume), block.core)
    assert np.abs(blocks - whole).max() <= 1e-5
    # The whole-volume path combines the members' float16 caches: the same up to their rounding.
    assert np.abs(blocks - predictor.probabilities(volume)).max() < 1e-3
