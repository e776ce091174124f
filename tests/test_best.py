"""Choosing by the leaderboard: `vlab submit best` and `vlab ensemble --top N`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from test_leaderboard import make_run

from vesuvius_lab.cli import main
from vesuvius_lab.core.config.spec import EnsembleSpec
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.reports.best import best_run, strongest_members


def _mark(run: Path, kind: str) -> None:
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "kind": kind}))


def test_best_is_the_run_of_the_first_row(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "weak", 0, 0.5)
    strong = make_run(runs, "strong", 0, 0.7)
    run, row = best_run(runs)
    assert run.path == strong and row.experiment == "strong"


def test_best_refuses_a_row_of_several_folds_and_says_how_to_combine_them(tmp_path):
    runs = tmp_path / "runs"
    for fold, score in enumerate((0.6, 0.7)):
        make_run(runs, "folds", fold, score)
    make_run(runs, "single", 0, 0.5)
    with pytest.raises(UserError, match=r"folds.*averages 2 fold runs.*vlab ensemble"):
        best_run(runs)


def test_best_without_any_scored_run_is_a_message(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "unscored", 0, None)
    with pytest.raises(UserError, match="no scored run"):
        best_run(runs)


def test_strongest_members_are_trained_experiments_in_rank_order_with_their_folds(tmp_path):
    runs = tmp_path / "runs"
    _mark(make_run(runs, "an-ensemble", 0, 0.9), "ensemble")
    _mark(make_run(runs, "a-tuned", 0, 0.8), "tuned")
    for fold in (0, 2):
        make_run(runs, "second", fold, 0.6)
    make_run(runs, "first", 1, 0.7)
    make_run(runs, "third", 0, 0.4)
    members = strongest_members(runs, 2)
    assert members == [{"experiment": "first", "folds": [1]}, {"experiment": "second", "folds": [0, 2]}]
    EnsembleSpec.model_validate({"members": members})  # what --top passes on is a valid [ensemble]
    with pytest.raises(UserError, match=r"--top 4: .* has 3 scored trained experiment\(s\) \(first, second, third\)"):
        strongest_members(runs, 4)


def test_ensemble_top_with_too_few_experiments_exits_2_before_any_run(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("VLAB_RUNS", str(runs))  # not --runs: in-process, it would stay in os.environ
    make_run(runs, "only", 0, 0.6)
    file = tmp_path / "ens.toml"
    file.write_text('name = "ens"\n[ensemble]\nmembers = [{ experiment = "x" }, { experiment = "y" }]\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["ensemble", str(file), "--top", "2"])
    assert exit_info.value.code == 2
    assert "--top 2" in capsys.readouterr().err
    assert not (runs / "ens").exists()


def test_submit_best_writes_the_submission_of_the_leaders_run(tiny_run, synth_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLAB_RUNS", str(Path(tiny_run).parents[1]))
    output = tmp_path / "submission.zip"
    main(["--device", "cpu", "submit", "best", "--input", str(synth_data / "test_images"),
          "--output", str(output)])
    assert f"run {tiny_run}" in capsys.readouterr().err.replace("\n", "")
    with zipfile.ZipFile(output) as archive:
        assert sorted(archive.namelist()) == sorted(p.name for p in (synth_data / "test_images").glob("*.tif"))
