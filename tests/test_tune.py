"""`vlab tune`: the [tune] space, out-of-fold cases, Optuna searches, the honest estimate, records, resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from conftest import tiny_experiment

from vesuvius_lab.core.config.experiment import load_experiment
from vesuvius_lab.core.config.spec import Experiment, TuneRange
from vesuvius_lab.core.runs.folder import Run, effective_state, find_runs
from vesuvius_lab.core.tuning.cases import Case, regroup
from vesuvius_lab.core.tuning.space import apply_values, current_values

TUNE = """
[[postprocess]]
plugin = "threshold"
params = { value = 0.5 }
[[postprocess]]
plugin = "remove_small_components"
params = { min_voxels = 10 }
[tune]
"postprocess.0.params.value" = { low = 0.05, high = 0.95 }
"postprocess.1.params.min_voxels" = { low = 1, high = 2000, log = true }
"""


def vlab(args: list[str], project: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vesuvius_lab", "--project", str(project), *args],
                          capture_output=True, text=True, timeout=900, **kwargs)


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory) -> Path:
    """Two fold runs of a small experiment with a [tune] table; returns the project folder."""
    root = tmp_path_factory.mktemp("tune")
    (root / "vesuvius.toml").write_text(f'data_root = "{synth_data}"\nruns_dir = "runs"\ndevice = "cpu"\n')
    (root / "tiny.toml").write_text(tiny_experiment(epochs=2, iterations=15) + TUNE)
    for fold in (0, 1):
        result = vlab(["train", str(root / "tiny.toml"), "--fold", str(fold)], root / "vesuvius.toml")
        assert result.returncode == 0, result.stderr
    return root


def completed_trials(db: Path) -> int:
    """Completed trials in a study database that another process is writing; read-only, so the reader
    never creates tables under the writer (optuna.load_study would)."""
    import sqlite3

    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as connection:
            return connection.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return 0


def study_trials(db: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials


# --------------------------------------------------------------------------- the space


def test_a_trial_is_applied_to_the_spec_and_validated_again():
    spec = Experiment.model_validate({"name": "x", "model": {"plugin": "smp_unet25d"},
                                      "postprocess": [{"plugin": "threshold", "params": {"value": 0.5}}]})
    tuned = apply_values(spec, {"postprocess.0.params.value": 0.3, "inference.threshold": 0.4})
    assert tuned.postprocess[0].params == {"value": 0.3} and tuned.inference.threshold == 0.4
    space = {"postprocess.0.params.value": TuneRange(low=0.1, high=0.9),
             "inference.threshold": TuneRange(choices=[0.2, 0.3])}
    assert current_values(spec, space) == {"postprocess.0.params.value": 0.5}  # 0.5 is not a choice


def test_cases_of_one_fold_are_split_into_pseudo_folds():
    cases = [Case(str(i), 0, "p", "l") for i in range(5)]
    assert sorted({c.group for c in regroup(cases)}) == [0, 1, 2]
    two_folds = [Case("a", 0, "p", "l"), Case("b", 1, "p", "l")]
    assert regroup(two_folds) == two_folds


def test_a_bad_tune_key_is_refused_by_validate(tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text(tiny_experiment() + TUNE + '"model.params.encoder" = { choices = ["resnet34"] }\n'
                    '"postprocess.1.params.min_vox" = { low = 1, high = 5 }\n')
    result = subprocess.run([sys.executable, "-m", "vesuvius_lab", "validate", str(file)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert 'tune."model.params.encoder": vlab tune re-runs the post-processing' in result.stderr
    assert 'tune."postprocess.1.params.min_vox": unknown key "min_vox"' in result.stderr
    assert ":33:" in result.stderr or "bad.toml:" in result.stderr


# --------------------------------------------------------------------------- a whole tuning


@pytest.fixture(scope="module")
def tuned(trained) -> Run:
    result = vlab(["tune", str(trained / "tiny.toml"), "--trials", "8", "--workers", "2"], trained / "vesuvius.toml")
    assert result.returncode == 0, result.stderr
    (run,) = [r for r in find_runs(trained / "runs") if r.experiment == "tiny-tuned"]
    return run


def test_tuning_records_an_honest_run_and_a_tuned_file(tuned, trained):
    record = tuned.read("tuning.json")
    assert effective_state(tuned) == "finished"
    assert {case["group"] for case in record["cases"]} == {0, 1} and len(record["cases"]) >= 4
    assert len(record["sources"]) == 2 and set(record["groups"]) == {"0", "1"}
    summary = tuned.read("summary.json")
    assert summary["kind"] == "tuned" and summary["estimate"] == "cross-validated"
    assert summary["score"] == pytest.approx(record["cross_validated"])
    assert record["in_sample"] >= record["untuned"] - 1e-9  # the untuned chain is the first trial
    trials = tuned.read("trials.json")["trials"]
    assert len(trials) == 8 and all(t["state"] == "COMPLETE" for t in trials)
    for name in ("tiny-tuned", "tiny-tuned-cv0", "tiny-tuned-cv1"):
        assert len(study_trials(tuned.path / "study.db", name)) == 8
    tuned_file = trained / "tiny.tuned.toml"
    assert record["tuned_file"] == str(tuned_file) and "# Cross-validated score" in tuned_file.read_text()
    spec = load_experiment(tuned_file).spec
    assert spec.name == "tiny-tuned"
    assert spec.postprocess[0].params["value"] == pytest.approx(record["best"]["postprocess.0.params.value"])


def test_the_leaderboard_ranks_the_tuned_run_as_its_own_row(tuned, trained):
    board = vlab(["leaderboard", "--json"], trained / "vesuvius.toml")
    assert board.returncode == 0, board.stderr
    rows = {row["experiment"]: row for row in json.loads(board.stdout)["rows"]}
    assert {"tiny", "tiny-tuned"} <= set(rows)
    text = vlab(["leaderboard"], trained / "vesuvius.toml", env={**os.environ, "COLUMNS": "250"})
    assert "tiny-tuned (tuned, cross-validated)" in " ".join(text.stdout.split())


def test_a_tuned_run_predicts_and_reports(tuned, trained, synth_data, tmp_path):
    out = tmp_path / "pred"
    result = vlab(["predict", str(tuned.path), "--input", str(synth_data / "test_images"), "--output", str(out)],
                  trained / "vesuvius.toml")
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.tif"))) == len(list((synth_data / "test_images").glob("*.tif")))
    report = vlab(["report", str(tuned.path), "--output", str(tmp_path / "report")], trained / "vesuvius.toml")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "tuning.png").stat().st_size > 10_000
    assert "tuning.png" in (tmp_path / "report" / "index.html").read_text()


def test_a_killed_tune_resumes_with_no_trial_lost(trained, tmp_path):
    project = trained / "vesuvius.toml"
    file = trained / "resume.toml"
    file.write_text((trained / "tiny.toml").read_text().replace('"postprocess.0.params.value" = { low = 0.05',
                                                                '"postprocess.0.params.value" = { low = 0.06'))
    command = [sys.executable, "-m", "vesuvius_lab", "--project", str(project), "tune", str(file),
               "--trials", "25", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    before: list = []
    while time.time() < deadline and len(before) < 4:
        time.sleep(0.5)
        runs = [r for r in find_runs(trained / "runs") if r.experiment == "tiny-tuned" and
                (r.path / "study.db").is_file() and r.read("tuning.json", {}).get("target") == str(file)]
        if runs:
            before = [None] * completed_trials(runs[0].path / "study.db")
        assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    (run,) = runs
    assert effective_state(run) == "killed"
    before = [t for t in study_trials(run.path / "study.db", "tiny-tuned") if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(before) >= 4
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert f"continuing {run.path}" in " ".join(again.stderr.split())
    after = study_trials(run.path / "study.db", "tiny-tuned")
    assert len([t for t in after if t.state == optuna.trial.TrialState.COMPLETE]) == 25
    kept = {t.number: (t.params, t.value) for t in after}
    assert all(kept[t.number] == (t.params, t.value) for t in before)  # every trial before the kill is kept
    assert effective_state(run) == "finished"
