"""[sweep] expansion, its errors, `vlab validate` on sweeps, planning `vlab run`, and one real sweep run."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from vesuvius_lab.cli import main
from vesuvius_lab.core.config.experiment import SpecError, parse_override
from vesuvius_lab.core.config.project import load_project
from vesuvius_lab.core.config.checked import expand
from vesuvius_lab.core.config.sweep import key_labels, name_part, sweep_name, toml_value
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.launch.batch import finished_run, parse_folds, plan
from vesuvius_lab.core.reports.leaderboard import build_leaderboard

TINY = """
name = "tiny"
[data]
window = [8, 32, 32]
folds = {folds}
[model]
plugin = "smp_unet25d"
params = {{ encoder = "resnet18", encoder_depth = 3, decoder_channels = [16, 8, 4] }}
[train]
epochs = 1
iterations_per_epoch = 2
batch_size = 1
workers = 0
[inference]
overlap = 0.0
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def tiny(tmp_path: Path, sweep: str = "", *, name: str = "tiny", folds: int = 3, file: str = "exp.toml") -> Path:
    text = TINY.format(folds=folds).replace('name = "tiny"', f'name = "{name}"')
    return write(tmp_path / file, text + ("\n[sweep]\n" + textwrap.dedent(sweep) if sweep else ""))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No vesuvius.toml above, and VLAB_DATA / VLAB_RUNS restored after the test (--data writes them)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLAB_DATA", "")  # empty = unset; setenv (unlike delenv of an absent name) is undone
    monkeypatch.setenv("VLAB_RUNS", "")
    return tmp_path


# --------------------------------------------------------------------------- expansion


def test_a_grid_expands_into_named_validated_experiments(tmp_path):
    path = tiny(tmp_path, '"model.params.encoder" = ["resnet18", "resnet34"]\n"train.lr" = [1e-3, 3e-4]\n')
    expanded = expand(path)
    assert [e.spec.name for e in expanded] == [
        "tiny-encoder_resnet18-lr_0.001", "tiny-encoder_resnet18-lr_0.0003",
        "tiny-encoder_resnet34-lr_0.001", "tiny-encoder_resnet34-lr_0.0003"]
    assert [(e.spec.model.params["encoder"], e.spec.train.lr) for e in expanded] == [
        ("resnet18", 1e-3), ("resnet18", 3e-4), ("resnet34", 1e-3), ("resnet34", 3e-4)]
    assert all(e.spec.sweep == {} for e in expanded)  # each run records what it ran, not the grid
    assert all(e.spec.model.params["decoder_channels"] == [16, 8, 4] for e in expanded)


def test_unquoted_dotted_keys_and_command_line_overrides(tmp_path):
    path = tiny(tmp_path, "train.lr = [0.01, 0.02]\n")
    expanded = expand(path, ["train.epochs=5"])
    assert [e.spec.name for e in expanded] == ["tiny-lr_0.01", "tiny-lr_0.02"]
    assert [e.spec.train.epochs for e in expanded] == [5, 5]


def test_a_file_without_sweep_is_itself(tmp_path):
    (loaded,) = expand(tiny(tmp_path))
    assert loaded.spec.name == "tiny"


@pytest.mark.parametrize("value", [3, -2, 1.5, 1e-5, float("inf"), "resnet18", 'a "quoted"\\ name ü', True,
                                   [8, 64, 64], [[1, 2], ["a"]], {"plugin": "dice", "weight": 0.5}, []])
def test_values_survive_the_trip_through_set(value):
    keys, parsed = parse_override(f"a.b={toml_value(value)}")
    assert keys == ("a", "b") and parsed == value and type(parsed) is type(value)


def test_run_names_stay_valid_and_tell_keys_apart():
    assert key_labels(["train.batch_size", "inference.batch_size", "model.params.encoder"]) == {
        "train.batch_size": "train.batch_size", "inference.batch_size": "inference.batch_size",
        "model.params.encoder": "encoder"}
    assert name_part([8, 64, 64]) == "8x64x64"
    assert name_part("tu-convnext/small v2") == "tu-convnext_small_v2"
    assert name_part(False) == "false"
    assert sweep_name("x", {"data.window": [8, 64, 64], "train.amp": "bf16"}) == "x-window_8x64x64-amp_bf16"


def problems(path: Path, overrides=()) -> list:
    with pytest.raises(SpecError) as info:
        expand(path, overrides)
    return info.value.problems


def test_an_unknown_sweep_key_is_reported_at_its_line(tmp_path):
    path = tiny(tmp_path, '"train.lr" = [0.1]\n"train.epochz" = [1, 2]\n')
    found = problems(path)
    assert len(found) == 1  # the same problem in both combinations is reported once
    problem = found[0]
    assert problem.file == str(path) and problem.line == 18 and problem.path == 'sweep."train.epochz"'
    assert problem.message.startswith('unknown key "epochz". Did you mean "epochs"?')  # whatever the value


def test_an_invalid_sweep_value_names_the_value(tmp_path):
    path = tiny(tmp_path, '"train.epochs" = [2, 0]\n"train.lr" = [0.1, 0.2]\n')
    (problem,) = problems(path)
    assert problem.path == 'sweep."train.epochs"' and problem.line == 17
    assert problem.message.startswith("train.epochs = 0: ") and "greater than or equal to 1" in problem.message


def test_a_value_that_breaks_a_plugin_check_names_the_combination(tmp_path):
    path = tiny(tmp_path, '"data.window" = [[8, 32, 32], [8, 30, 30]]\n')
    found = problems(path)
    assert found and all("data.window = [8, 30, 30]" in p.message for p in found)


def test_empty_value_lists_and_clashing_names_are_errors(tmp_path):
    (empty,) = problems(tiny(tmp_path, '"train.lr" = []\n', file="a.toml"))
    assert empty.path == "sweep.train.lr" and "at least 1" in empty.message
    (clash,) = problems(tiny(tmp_path, '"description" = ["a b", "a_b"]\n', file="b.toml"))
    assert clash.path == "sweep" and "both give the run name 'tiny-description_a_b'" in clash.message


def test_vlab_validate_checks_every_combination(tmp_path, capsys):
    good = tiny(tmp_path, '"train.lr" = [0.1, 0.2]\n', file="good.toml")
    main(["validate", str(good)])
    output = capsys.readouterr().out
    assert "tiny-lr_0.1" in output and "tiny-lr_0.2" in output
    bad = tiny(tmp_path, '"train.epochs" = [1, -1]\n', file="bad.toml")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(good), str(bad)])
    assert exit_info.value.code == 2
    assert 'bad.toml:17: sweep."train.epochs": train.epochs = -1' in capsys.readouterr().err


# --------------------------------------------------------------------------- planning vlab run


def test_folds_option():
    assert parse_folds(None) is None and parse_folds("all") == "all" and parse_folds("2,0,2") == [2, 0]
    for text in ("x", "-1", ","):
        with pytest.raises(UserError, match="--folds"):
            parse_folds(text)


def test_plan_expands_sweeps_and_folds_and_reports_missing_folds(isolated):
    project = load_project().with_overrides(data=str(isolated / "data"), runs=str(isolated / "runs"))
    sweep = tiny(isolated, '"train.lr" = [0.1, 0.2]\n', file="s.toml")
    jobs, found = plan([sweep], project, folds="all")
    assert [job.label for job in jobs] == [f"tiny-lr_{lr} fold {k}" for lr in (0.1, 0.2) for k in range(3)]
    assert all(job.spec.data.root == isolated / "data" for job in jobs)
    jobs, found = plan([sweep], project, folds=[1, 3])
    assert [job.label for job in jobs] == ["tiny-lr_0.1 fold 1", "tiny-lr_0.2 fold 1"]
    assert len(found) == 2 and "fold 3 does not exist; data.folds = 3" in found[0].message


def test_a_finished_run_with_the_same_spec_is_found(isolated):
    project = load_project().with_overrides(data=str(isolated / "data"), runs=str(isolated / "runs"))
    (job,), _ = plan([tiny(isolated)], project)
    run = project.runs_dir / "tiny" / "fold0-1"
    run.mkdir(parents=True)
    (run / "spec.json").write_text(json.dumps(job.spec.model_dump(mode="json")))
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": 0}))
    assert finished_run(project.runs_dir, job.spec) is None  # not finished
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    assert finished_run(project.runs_dir, job.spec).path == run
    other = job.spec.model_copy(update={"train": job.spec.train.model_copy(update={"lr": 0.5})})
    assert finished_run(project.runs_dir, other) is None  # another setting: not the same experiment


# --------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_vlab_run_trains_a_sweep_ranks_it_and_skips_it_the_second_time(synth_data, isolated, capsys):
    data = shutil.copytree(synth_data, isolated / "data")
    runs = isolated / "runs"
    sweep = tiny(isolated, '"train.lr" = [0.001, 0.01]\n', file="sweep.toml")
    broken = tiny(isolated, name="broken", folds=7, file="broken.toml")  # 7 folds of 6 volumes: fails
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(data), "--runs", str(runs), "run", str(sweep), str(broken)])
    assert exit_info.value.code == 2  # broken failed; the sweep still ran
    captured = capsys.readouterr()
    assert "failed broken fold 0: 7 folds need at least 7 training volumes" in captured.err
    assert "tiny-lr_0.001" in captured.out and "tiny-lr_0.01" in captured.out  # the leaderboard
    board = build_leaderboard(runs)
    assert sorted(row.experiment for row in board.rows) == ["tiny-lr_0.001", "tiny-lr_0.01"]
    assert [row.rank for row in board.rows] in ([1, 2], [1, 1])
    assert board.spec_keys == ["train.lr"]
    assert all(0 <= row.stats["score"].mean <= 1 for row in board.rows)
    assert any(n.kind == "missing folds" for n in board.notices)  # one fold of three

    before = sorted(runs.glob("*/*/spec.json"))
    main(["--data", str(data), "--runs", str(runs), "run", str(sweep)])
    err = capsys.readouterr().err
    assert err.count("skipped tiny-lr_") == 2 and "0 trained, 2 skipped, 0 failed" in err
    assert sorted(runs.glob("*/*/spec.json")) == before
