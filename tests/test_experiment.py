"""Experiment files: extends, --set, precedence, and errors reported all at once with lines."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from vesuvius_lab.cli import main
from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.config.project import load_project


@pytest.fixture
def example_model() -> str:
    """A built-in model plugin whose default params are valid for the default window."""
    return "smp_unet25d"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


VALID = """
    name = "ok"
    [model]
    plugin = "m"
    [[loss]]
    plugin = "dice"
    weight = 0.7
    [[loss]]
    plugin = "bce"
    params = { pos_weight = 2.0 }
    [train]
    epochs = 3
    [inference]
    blend = { plugin = "gaussian", params = { sigma_scale = 0.25 } }
"""


def problems_of(path, overrides=()) -> list:
    with pytest.raises(SpecError) as info:
        load_experiment(path, list(overrides))
    return info.value.problems


def test_unknown_model_plugin_is_reported_with_line_and_choices(tmp_path):
    path = write(tmp_path / "e.toml", VALID)
    (problem,) = problems_of(path)
    assert problem.line == 3 and problem.path == "model.plugin"
    assert 'No models plugin is called "m"' in problem.message


def test_valid_file_loads_with_plugin_params_and_defaults(tmp_path, example_model):
    path = write(tmp_path / "e.toml", VALID.replace('plugin = "m"', f'plugin = "{example_model}"'))
    spec = load_experiment(path).spec
    assert [t.plugin for t in spec.loss] == ["dice", "bce"] and spec.loss[0].weight == 0.7
    assert spec.loss[1].params == {"pos_weight": 2.0}
    assert spec.inference.blend.params == {"sigma_scale": 0.25}
    assert spec.train.epochs == 3 and spec.train.batch_size == 2  # default kept


def test_every_error_at_once_with_lines_and_suggestions(tmp_path, example_model):
    path = write(tmp_path / "bad.toml", f"""
        name = "bad"
        [model]
        plugin = "{example_model}"
        [[loss]]
        plugin = "dicee"
        [train]
        epoch = 3
        lr = "fast"
        [inference]
        blend = {{ plugin = "gaussian", params = {{ sigma = 0.1 }} }}
    """)
    problems = {p.path: p for p in problems_of(path)}
    assert set(problems) == {"train.epoch", "train.lr", "loss.0.plugin", "inference.blend.params.sigma"}
    assert problems["train.epoch"].line == 7 and 'Did you mean "epochs"?' in problems["train.epoch"].message
    assert problems["train.lr"].line == 8 and "'fast'" in problems["train.lr"].message
    assert problems["loss.0.plugin"].line == 5 and 'Did you mean "dice"?' in problems["loss.0.plugin"].message
    assert problems["inference.blend.params.sigma"].line == 10
    assert 'Did you mean "sigma_scale"?' in problems["inference.blend.params.sigma"].message
    assert all(p.file == str(path.resolve()) for p in problems.values())


def test_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path / "syntax.toml", 'name = "x"\n[train]\nepochs = = 3\n')
    (problem,) = problems_of(path)
    assert problem.line == 3 and "TOML syntax error" in problem.message


def test_extends_deep_merges_and_reports_errors_in_the_parent(tmp_path, example_model):
    write(tmp_path / "base.toml", f"""
        name = "base"
        [model]
        plugin = "{example_model}"
        [train]
        epochs = 10
        batch_size = 8
        optimiser = "sgd"
    """)
    child = write(tmp_path / "sub" / "child.toml", """
        name = "child"
        extends = "../base.toml"
        [train]
        epochs = 2
    """)
    (problem,) = problems_of(child)
    assert problem.file == str((tmp_path / "base.toml").resolve()) and problem.line == 7
    assert 'Did you mean "optimizer"?' in problem.message
    fixed = tmp_path / "base.toml"
    fixed.write_text(fixed.read_text().replace('optimiser = "sgd"', 'optimizer = "sgd"'))
    spec = load_experiment(child).spec
    assert (spec.name, spec.train.epochs, spec.train.batch_size, spec.train.optimizer) == ("child", 2, 8, "sgd")


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path / "a.toml", 'name = "a"\nextends = "b.toml"\n')
    write(tmp_path / "b.toml", 'name = "b"\nextends = "a.toml"\n')
    assert any("extends cycle" in p.message for p in problems_of(tmp_path / "a.toml"))
    write(tmp_path / "c.toml", 'name = "c"\nextends = "nowhere.toml"\n')
    problem = next(p for p in problems_of(tmp_path / "c.toml") if p.path == "extends")
    assert problem.line == 2 and "nowhere.toml" in problem.message


def test_set_overrides_parse_toml_values_and_are_validated(tmp_path, example_model):
    path = write(tmp_path / "e.toml", VALID.replace('plugin = "m"', f'plugin = "{example_model}"'))
    spec = load_experiment(path, ["train.epochs=7", "data.window=[8, 32, 32]", "loss.1.weight=0.25",
                                  "description=plain words"]).spec
    assert spec.train.epochs == 7 and spec.data.window == (8, 32, 32) and spec.loss[1].weight == 0.25
    assert spec.description == "plain words"
    (problem,) = problems_of(path, ["train.epochs=-1"])
    assert problem.path == "train.epochs" and problem.file.startswith("--set")


def test_precedence_cli_env_experiment_project(tmp_path, monkeypatch, example_model):
    project_file = write(tmp_path / "vesuvius.toml", 'data_root = "from-project"\nseed = 5\nfolds = 3\n')
    exp = write(tmp_path / "e.toml", f'name = "p"\n[model]\nplugin = "{example_model}"\n')
    monkeypatch.delenv("VLAB_DATA", raising=False)
    project = load_project(project_file)
    spec = project.resolve(load_experiment(exp).spec)
    assert spec.data.root == tmp_path / "from-project" and spec.train.seed == 5 and spec.data.folds == 3
    with_root = load_experiment(exp, ["data.root=from-experiment", "train.seed=9"]).spec
    assert project.resolve(with_root).data.root == tmp_path / "from-experiment"
    assert project.resolve(with_root).train.seed == 9
    monkeypatch.setenv("VLAB_DATA", str(tmp_path / "from-env"))
    assert project.resolve(with_root).data.root == tmp_path / "from-env"
    cli_project = project.with_overrides(data=str(tmp_path / "from-cli"))
    assert cli_project.resolve(with_root).data.root == tmp_path / "from-cli"


def test_project_file_is_found_upwards(tmp_path, monkeypatch):
    write(tmp_path / "vesuvius.toml", 'runs_dir = "my-runs"\n')
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    monkeypatch.delenv("VLAB_RUNS", raising=False)
    assert load_project().runs_dir == tmp_path / "my-runs"


def test_bad_project_file_is_a_user_error(tmp_path, capsys):
    bad = write(tmp_path / "vesuvius.toml", "seed = 'x'\nworkerz = 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--project", str(bad), "data", "check"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "workerz" in err and "seed" in err and "Traceback" not in err


def test_validate_command_exit_status_and_output(tmp_path, capsys, example_model):
    good = write(tmp_path / "good.toml", VALID.replace('plugin = "m"', f'plugin = "{example_model}"'))
    bad = write(tmp_path / "bad.toml", VALID.replace("epochs = 3", "epochs = 0"))
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(good), str(bad)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "ok" in captured.out and "train.epochs" in captured.err and "model.plugin" in captured.err
    main(["validate", str(good)])  # no exception: exit 0


def test_schema_is_json_schema_of_experiments(capsys):
    main(["schema"])
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "Experiment" and {"model", "ensemble", "train"} <= set(schema["properties"])
    assert "name" in schema["required"]
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("value, device, workers", [("auto", "cpu", 0), ("auto", "cuda:0", 2), (None, "cpu", 0),
                                                     (3, "cpu", 3), (0, "cuda", 0)])
def test_auto_loader_workers_are_none_on_the_cpu_and_two_on_cuda(value, device, workers):
    from vesuvius_lab.core.config.spec import loader_workers

    assert loader_workers(value, device) == workers


@pytest.mark.parametrize("line, accepted", [('workers = "auto"', True), ("workers = 4", True),
                                            ("workers = -1", False), ('workers = "many"', False)])
def test_train_workers_take_a_number_or_auto(tmp_path, line, accepted):
    path = tmp_path / "e.toml"
    path.write_text(f'name = "x"\n[model]\nplugin = "smp_unet25d"\n[train]\n{line}\n')
    if accepted:
        assert load_experiment(path).spec.train.workers in ("auto", 4)
    else:
        with pytest.raises(SpecError) as info:
            load_experiment(path)
        assert info.value.problems[0].path == "train.workers"
