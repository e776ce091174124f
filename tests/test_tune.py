"""`vlab tune`: the [tune] space, out-of-fold cases, Optuna searches, the honest estimate, records, resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from contextlib import closing
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import run_cli, tiny_experiment

from vesuvius_lab.core.config.experiment import load_experiment
from vesuvius_lab.core.config.spec import Experiment, TuneRange
from vesuvius_lab.core.runs.folder import Run, effective_state, find_runs, new_run
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


def vlab(args: list[str], project: Path) -> subprocess.CompletedProcess:
    return run_cli(["--project", str(project), *args])


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
    # the untuned chain is the first trial, so the search never ends below it (by its objective, the default)
    assert record["objective"] == "mean over volumes" and record["plateau"] is None
    assert record["in_sample_objective"] >= record["untuned_objective"] - 1e-9
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
    text = subprocess.run([sys.executable, "-m", "vesuvius_lab", "--project", str(trained / "vesuvius.toml"),
                           "leaderboard"], env={**os.environ, "COLUMNS": "250"}, capture_output=True, text=True)
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


def test_a_tuned_run_exported_with_its_sources_predicts_where_they_were_never(tuned, trained, synth_data, tmp_path):
    """The tuning record names its source runs by absolute path; in a bundle (or any copied runs folder) they are
    found beside the tuning run instead."""
    import shutil

    copied = tmp_path / "copied"  # a runs folder that came from another machine: its recorded paths are not here
    shutil.copytree(trained / "runs", copied)
    moved = Run(copied / "tiny-tuned" / tuned.id)
    record = moved.read("tuning.json")
    record["sources"] = [f"/elsewhere/runs/{Path(source).parent.name}/{Path(source).name}" for source in record["sources"]]
    moved.write("tuning.json", record)
    bundle = tmp_path / "bundle"
    made = run_cli(["--runs", str(copied), "export", f"tiny-tuned/{tuned.id}", "--output", str(bundle), "--no-wheels"])
    assert made.returncode == 0, made.stderr
    shutil.rmtree(copied)
    assert sorted(p.name for p in (bundle / "runs").iterdir()) == ["tiny", "tiny-tuned"]
    assert len(list((bundle / "runs" / "tiny").iterdir())) == len(record["sources"])
    result = run_cli(["--runs", str(bundle / "runs"), "submit", f"tiny-tuned/{tuned.id}", "--input",
                      str(synth_data / "test_images"), "--output", str(tmp_path / "s.zip")])
    assert result.returncode == 0, result.stderr
    here = run_cli(["--project", str(trained / "vesuvius.toml"), "submit", str(tuned.path), "--input",
                    str(synth_data / "test_images"), "--output", str(tmp_path / "here.zip")])
    assert here.returncode == 0, here.stderr
    with zipfile.ZipFile(tmp_path / "s.zip") as exported, zipfile.ZipFile(tmp_path / "here.zip") as original:
        assert exported.namelist() == original.namelist()
        assert all(exported.read(name) == original.read(name) for name in original.namelist())


def test_a_robust_objective_and_a_plateau_choose_the_chain_and_say_what_to_check(trained, tmp_path):
    file = trained / "robust.toml"
    file.write_text((trained / "tiny.toml").read_text().replace("[tune]\n", '[tune]\nobjective = "worst_group"\n'))
    result = vlab(["tune", str(file), "--trials", "8", "--workers", "2", "--plateau", "0.1"], trained / "vesuvius.toml")
    assert result.returncode == 0, result.stderr
    assert "objective: worst group's mean" in " ".join(result.stderr.split())
    (run,) = [r for r in find_runs(trained / "runs") if r.read("tuning.json", {}).get("target") == str(file)]
    record = run.read("tuning.json")
    assert record["choice"] == {"objective": "worst_group", "group_by": "scroll", "plateau": 0.1}
    groups = record["volume_groups"]["groups"]
    assert set(groups) == {case["id"] for case in record["cases"]} and len(set(groups.values())) >= 2
    trials = run.read("trials.json")
    for trial in trials["trials"]:  # each trial's value is the worst group's mean of its volume scores
        means = {}
        for volume, score in trial["volumes"].items():
            means.setdefault(groups[volume], []).append(score)
        assert trial["score"] == pytest.approx(min(np.mean(v) for v in means.values()))
    chosen = record["plateau"]["candidates"][record["plateau"]["chosen"]]
    assert chosen["values"] == record["best"] and chosen["neighbours"] >= 1
    assert record["plateau"]["neighbourhood"] == pytest.approx(max(c["neighbourhood"] for c in
                                                                   record["plateau"]["candidates"]))
    assert set(trials["neighbours"]) == {"tiny-tuned", "tiny-tuned-cv0", "tiny-tuned-cv1"}
    assert set(record["profiles"]) == set(record["space"]) and isinstance(record["notices"], list)
    assert sum(f"check: {n['message'][:30]}" in " ".join(result.stderr.split()) for n in record["notices"]) == \
        len(record["notices"])
    report = vlab(["report", str(run.path), "--output", str(tmp_path / "report")], trained / "vesuvius.toml")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "tuning.png").stat().st_size > 10_000


def test_a_tune_table_with_options_and_no_range_is_refused_with_the_reason(trained):
    file = trained / "options-only.toml"
    file.write_text(tiny_experiment(epochs=2, iterations=15) + '[tune]\nobjective = "worst_group"\n')
    result = vlab(["tune", str(file), "--trials", "2"], trained / "vesuvius.toml")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no range to search in [tune]" in " ".join(result.stderr.split())


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
    again = run_cli(command[3:])  # continued in this process: only the kill needed one of its own
    assert again.returncode == 0, again.stderr
    assert f"continuing {run.path}" in " ".join(again.stderr.split())
    after = study_trials(run.path / "study.db", "tiny-tuned")
    assert len([t for t in after if t.state == optuna.trial.TrialState.COMPLETE]) == 25
    kept = {t.number: (t.params, t.value) for t in after}
    assert all(kept[t.number] == (t.params, t.value) for t in before)  # every trial before the kill is kept
    assert effective_state(run) == "finished"


# --------------------------------------------------------------------------- checked before anything starts


def tune_in_process(args: list[str], project: Path, capsys) -> tuple[int, str]:
    """`vlab --project PROJECT tune ARGS` in this process: (exit status, stderr)."""
    from vesuvius_lab.cli import main

    capsys.readouterr()
    try:
        main(["--project", str(project), "tune", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def tuning_runs(root: Path) -> set[Path]:
    return {r.path for r in find_runs(root / "runs") if r.experiment == "tiny-tuned"}


def own_project(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained project (its runs and their probability caches), for tests that damage it."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("*-tuned", "*.tuned.toml"))
    return root


def another_study(path: Path, direction: str = "maximize") -> str:
    study = optuna.create_study(study_name="tiny-tuned", storage=f"sqlite:///{path}", direction=direction)
    study.optimize(lambda trial: trial.suggest_float("learning_rate", 0, 1), n_trials=2)
    return f"sqlite:///{path}"


def storage_cases(tmp_path: Path) -> list[tuple[str, str]]:
    (tmp_path / "notes.txt").write_text("not a database")
    good = tmp_path / "good.db"
    optuna.create_study(study_name="other", storage=f"sqlite:///{good}").optimize(
        lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    data = good.read_bytes()
    (tmp_path / "truncated.db").write_bytes(data[:len(data) // 2])
    return [
        ("not-a-url", "not a database URL"),
        ("foo://host/db", "unknown kind of database 'foo'"),
        ("postgresql://me:secret@127.0.0.1:1/db", "the Python driver for this database is not installed"),
        (f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'x.db'}", "cannot be opened or created"),
        (f"sqlite:///{tmp_path / 'notes.txt'}", "the study database is damaged (file is not a database)"),
        (f"sqlite:///{tmp_path / 'truncated.db'}", "the study database is damaged"),
        (f"sqlite:///file:{good}?mode=ro&uri=true", "the study database is read-only"),
        (another_study(tmp_path / "foreign.db"), "was not made by vesuvius-lab for this [tune] space"),
        (another_study(tmp_path / "minimizing.db", "minimize"), "minimizes its objective"),
    ]


def test_a_bad_storage_is_one_message_before_a_tuning_run_exists(trained, tmp_path, capsys):
    before = tuning_runs(trained)
    for storage, words in storage_cases(tmp_path):
        code, stderr = tune_in_process([str(trained / "tiny.toml"), "--trials", "2", "--workers", "1",
                                        "--storage", storage], trained / "vesuvius.toml", capsys)
        text = " ".join(stderr.split())
        assert code == 2 and words in text and "Traceback" not in stderr, (storage, stderr)
        assert text.count("error:") == 1 and "secret" not in text
        assert tuning_runs(trained) == before, storage  # no run folder: nothing new on the leaderboard


def test_a_study_of_another_tuning_in_a_shared_storage_is_refused(trained, tmp_path, capsys):
    project, file = trained / "vesuvius.toml", trained / "shared.toml"
    file.write_text((trained / "tiny.toml").read_text().replace("low = 0.05", "low = 0.08"))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    code, stderr = tune_in_process([str(file), "--trials", "2", "--workers", "1", "--storage", storage], project,
                                   capsys)
    assert code == 0, stderr
    before = tuning_runs(trained)
    file.write_text(file.read_text().replace("low = 0.08", "low = 0.09"))  # another space, the same study name
    code, stderr = tune_in_process([str(file), "--trials", "2", "--workers", "1", "--storage", storage], project,
                                   capsys)
    assert code == 2 and "was made by a tuning with another space" in " ".join(stderr.split())
    assert tuning_runs(trained) == before


def test_a_damaged_source_run_is_refused_once_before_a_tuning_run_exists(trained, tmp_path, capsys):
    root = own_project(trained, tmp_path)
    fold0 = sorted(r for r in find_runs(root / "runs") if r.experiment == "tiny")[0]
    (fold0.checkpoints / "best.pt").write_bytes(b"damaged")
    code, stderr = tune_in_process([str(root / "tiny.toml"), "--trials", "2", "--workers", "1"],
                                   root / "vesuvius.toml", capsys)
    text = " ".join(stderr.split())
    assert code == 2 and "Traceback" not in stderr
    assert text.count("best.pt: not a readable vesuvius-lab checkpoint") == 1 and "--checkpoint last" in text
    assert not tuning_runs(root)


def test_a_damaged_study_is_rebuilt_from_the_recorded_trials(trained, tmp_path, capsys):
    root = own_project(trained, tmp_path)
    project, file = root / "vesuvius.toml", root / "tiny.toml"
    code, stderr = tune_in_process([str(file), "--trials", "3", "--workers", "1"], project, capsys)
    assert code == 0, stderr
    (run,) = [Run(path) for path in tuning_runs(root)]
    first = {t.number: (t.params, t.value) for t in study_trials(run.path / "study.db", "tiny-tuned")}
    assert len(first) == 3 and len(run.read("trials.json")["cross_validation"]) == 2
    run.set_status("interrupted", signal="SIGINT")  # stopped: the next `vlab tune` continues it
    data = (run.path / "study.db").read_bytes()
    (run.path / "study.db").write_bytes(data[:len(data) // 2])
    code, stderr = tune_in_process([str(file), "--trials", "5", "--workers", "1"], project, capsys)
    text = " ".join(stderr.split())
    assert code == 0, stderr
    assert "was damaged (database disk image is malformed): rebuilt it from the 9 trial(s) recorded" in text
    after = {t.number: (t.params, t.value) for t in study_trials(run.path / "study.db", "tiny-tuned")}
    assert len(after) == 5 and all(after[n] == first[n] for n in first)  # the recorded trials kept
    assert (run.path / "study.db.damaged").is_file() and tuning_runs(root) == {run.path}
    assert effective_state(run) == "finished" and not {"error", "signal"} & set(run.read("status.json"))

    # damaged again, with no trial recorded: the message says how to start over, and --force does
    run.set_status("interrupted", signal="SIGINT")
    (run.path / "study.db").write_text("not a database any more")
    (run.path / "trials.json").unlink()
    code, stderr = tune_in_process([str(file), "--trials", "3", "--workers", "1"], project, capsys)
    text = " ".join(stderr.split())
    assert code == 2 and "records no trial to rebuild it from" in text and f"vlab tune {file} --force" in text
    assert tuning_runs(root) == {run.path}
    code, stderr = tune_in_process([str(file), "--trials", "2", "--workers", "1", "--force"], project, capsys)
    assert code == 0, stderr
    assert len(tuning_runs(root)) == 2


@pytest.mark.parametrize("record", ["tuning.json", "status.json"])
def test_a_killed_tuning_run_with_damaged_records_is_not_replaced_unasked(trained, tmp_path, capsys, record):
    from vesuvius_lab.core.config.checked import read_experiment
    from vesuvius_lab.core.config.project import load_project
    from vesuvius_lab.core.tuning.cases import source_runs
    from vesuvius_lab.core.tuning.tuner import tuning_identity

    root = own_project(trained, tmp_path)
    project = load_project(root / "vesuvius.toml")
    spec = project.resolve(read_experiment(root / "tiny.toml").spec)
    run = new_run(root / "runs", "tiny-tuned", 0)  # a killed tuning of this very space and these runs
    run.write("spec.json", {"name": "tiny-tuned"})
    run.write("tuning.json", tuning_identity(spec, source_runs(spec, project.runs_dir)))
    run.set_status("interrupted", signal="SIGINT")
    (run.path / record).write_text('{"damaged": ')
    code, stderr = tune_in_process([str(root / "tiny.toml"), "--trials", "2", "--workers", "1"],
                                   root / "vesuvius.toml", capsys)
    text = " ".join(stderr.split())
    assert code == 2 and f"{run.path / record}: damaged" in text and "--force" in text
    assert tuning_runs(root) == {run.path}


def test_a_tuned_run_predicts_blocks_as_the_mean_of_its_source_runs(tuned, synth_data):
    """Block-wise prediction of a large volume with a tuned run: its source runs' blocks, averaged."""
    from vesuvius_lab.core.data.tiff import read_volume
    from vesuvius_lab.core.inference.blocks import ArrayReader, BlockPlan, Box
    from vesuvius_lab.core.inference.run_kinds import load_run

    predictor = load_run(tuned.path)
    assert predictor.kind == "tuned" and predictor.blocks is not None
    volume = read_volume(sorted((synth_data / "test_images").glob("*.tif"))[0])
    whole = predictor.probabilities(volume)
    blocks = np.full(volume.shape, np.nan, np.float32)
    for block in BlockPlan(volume.shape, Box.of_shape(volume.shape), (16, 24, 32)).blocks():
        blocks[block.core.slices] = predictor.blocks(ArrayReader(volume), block.core)
    assert np.abs(blocks - whole).max() <= 1e-5


def test_the_tuned_file_of_an_ensemble_names_the_members_of_the_run_it_was_tuned_on(tmp_path):
    """`vlab ensemble FILE --top 2` may combine other members than FILE lists: the tuned file must name those."""
    from vesuvius_lab.core.tuning.tuner import write_tuned_file

    file = tmp_path / "ens.toml"
    file.write_text('name = "ens"\n[ensemble]\nmembers = [{ experiment = "a" }, { experiment = "b" }]\n'
                    '[[postprocess]]\nplugin = "threshold"\nparams = { value = 0.5 }\n')
    tuned = load_experiment(file).spec.model_copy(deep=True)
    tuned = tuned.model_copy(update={"ensemble": tuned.ensemble.model_copy(update={"members": [
        tuned.ensemble.members[0].model_copy(update={"experiment": "c", "folds": [0]}), tuned.ensemble.members[1]]})})
    record = {"trials": 3, "cases": [], "sources": ["runs/ens/fold0-1"], "cross_validated": None, "untuned": 0.5,
              "in_sample": 0.5}
    written = load_experiment(write_tuned_file(file, tuned, record, Run(tmp_path / "run"))).spec
    assert [(m.experiment, m.folds) for m in written.ensemble.members] == [("c", [0]), ("b", "all")]
    untouched = write_tuned_file(file, load_experiment(file).spec, record, Run(tmp_path / "run"))
    assert "[ensemble]" not in untouched.read_text()  # the file's own members: inherited through extends
