"""Files that cannot be read as text, pathological experiment files and misplaced blame.

Every case gets one clear message naming the file (and line, or the `--set` it came from), exit
status 2 and no traceback. The cases that fit the `# expect:` format are in tests/bad_inputs/;
these need files built on the fly (bytes that are not UTF-8, symlink loops, huge values) or
command-line options.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import vlab_process

from vesuvius_lab.core.data.dataset import Dataset
from vesuvius_lab.core.errors import UserError

EXPERIMENT = 'name = "x"\n[model]\nplugin = "smp_unet25d"\n'
#: "café" in Latin-1: byte 29 (0xe9, line 2) is not UTF-8.
LATIN1 = b'name = "x"\ndescription = "caf\xe9"\n[model]\nplugin = "smp_unet25d"\n'
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def assert_clear_failure(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def cwd(tmp_path) -> Path:
    """An empty working directory: nothing may be written into it."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    yield folder
    assert list(folder.iterdir()) == []


def symlink_loop(path: Path) -> Path:
    """``path`` -> ``path``.other -> ``path``."""
    other = path.with_name(path.name + ".other")
    other.symlink_to(path.name)
    path.symlink_to(other.name)
    return path


# --------------------------------------------------------------------------- text that is not UTF-8


def test_experiment_file_that_is_not_utf8(tmp_path, cwd, vlab_here):
    path = tmp_path / "latin1.toml"
    path.write_bytes(LATIN1)
    result = vlab_here(["validate", str(path)], cwd)
    assert_clear_failure(result, f"{path}:2: not UTF-8 text")
    assert "byte 29 (0xe9)" in result.stderr and "Save it as UTF-8" in result.stderr


def test_extends_parent_that_is_not_utf8(tmp_path, cwd, vlab_here):
    (tmp_path / "base.toml").write_bytes(LATIN1)
    child = tmp_path / "child.toml"
    child.write_text('name = "child"\nextends = "base.toml"\n')
    result = vlab_here(["validate", str(child)], cwd)
    assert_clear_failure(result, f"{tmp_path / 'base.toml'}:2: not UTF-8 text")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])  # with and without a byte-order mark
def test_experiment_file_in_utf16(encoding, tmp_path, cwd, vlab_here):
    path = tmp_path / "utf16.toml"
    path.write_bytes(EXPERIMENT.encode(encoding))
    result = vlab_here(["validate", str(path)], cwd)
    assert_clear_failure(result, f"{path}:1: not UTF-8 text")
    assert "UTF-16" in result.stderr and "Save it as UTF-8" in result.stderr


def test_a_utf8_byte_order_mark_is_accepted(tmp_path, cwd, vlab_here):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + EXPERIMENT.encode())
    result = vlab_here(["validate", str(path)], cwd)
    assert result.returncode == 0, result.stderr


def test_project_file_that_is_not_utf8(tmp_path, cwd, vlab_here):
    project = tmp_path / "vesuvius.toml"
    project.write_bytes(b"# donn\xe9es\nseed = 1\n")
    result = vlab_here(["--project", str(project), "data", "check", str(tmp_path / "data")], cwd)
    assert_clear_failure(result, f"{project}:1: not UTF-8 text")


def test_project_file_with_an_infinite_value(tmp_path, cwd, vlab_here):
    project = tmp_path / "vesuvius.toml"
    project.write_text('data_root = "data"\nseed = -inf\n')
    result = vlab_here(["--project", str(project), "data", "check", str(tmp_path / "data")], cwd)
    assert_clear_failure(result, f"{project}:2: seed: -inf is not a finite number")


def test_csv_index_that_is_not_utf8(tmp_path, cwd, vlab_here):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_bytes(b"id,scroll_id\nvol\xe9,1\n")
    with pytest.raises(UserError, match=r"train\.csv:2: not UTF-8 text: byte 16 \(0xe9\)"):
        Dataset.open(data)
    result = vlab_here(["data", "check", str(data)], cwd)
    assert_clear_failure(result, f"{data / 'train.csv'}:2: not UTF-8 text")


# --------------------------------------------------------------------------- files that cannot be read


def test_experiment_file_that_is_a_symlink_loop(tmp_path, cwd, vlab_here):
    path = symlink_loop(tmp_path / "loop.toml")
    result = vlab_here(["validate", str(path)], cwd)
    assert_clear_failure(result, f"{path}: too many levels of symbolic links (a symlink loop)")


def test_extends_parent_that_is_a_symlink_loop(tmp_path, cwd, vlab_here):
    symlink_loop(tmp_path / "base.toml")
    child = tmp_path / "child.toml"
    child.write_text('name = "child"\nextends = "base.toml"\n[model]\nplugin = "smp_unet25d"\n')
    result = vlab_here(["validate", str(child)], cwd)
    assert_clear_failure(result, "symlink loop")
    assert "not found" not in result.stderr


def test_experiment_file_that_is_a_folder(tmp_path, cwd, vlab_here):
    path = tmp_path / "folder.toml"
    path.mkdir()
    result = vlab_here(["validate", str(path)], cwd)
    assert_clear_failure(result, f"{path}: the path is a folder, where a file was expected")


@pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their permissions")
def test_experiment_file_without_read_permission(tmp_path, cwd, vlab_here):
    path = tmp_path / "secret.toml"
    path.write_text(EXPERIMENT)
    path.chmod(0)
    try:
        result = vlab_here(["validate", str(path)], cwd)
    finally:
        path.chmod(0o644)
    assert_clear_failure(result, f"{path}: permission denied")


@pytest.mark.parametrize("damage", ["symlink loop", "folder"])
def test_project_file_that_cannot_be_read(damage, tmp_path, cwd, vlab_here):
    project = tmp_path / "vesuvius.toml"
    symlink_loop(project) if damage == "symlink loop" else project.mkdir()
    passed = vlab_here(["--project", str(project), "data", "check", str(tmp_path / "data")], cwd)
    assert_clear_failure(passed, str(project))
    assert "not found" not in passed.stderr
    found = vlab_here(["data", "check", str(tmp_path / "data")], tmp_path)  # the nearest one: not skipped
    assert_clear_failure(found, f"{project}: ")
    assert damage in found.stderr and "not found" not in found.stderr


@pytest.mark.parametrize("damage", ["symlink loop", "folder"])
def test_csv_index_that_cannot_be_read(damage, tmp_path, cwd, vlab_here):
    data = tmp_path / "data"
    data.mkdir()
    train = data / "train.csv"
    symlink_loop(train) if damage == "symlink loop" else train.mkdir()
    with pytest.raises(UserError, match=damage):
        Dataset.open(data)
    result = vlab_here(["data", "check", str(data)], cwd)
    assert_clear_failure(result, f"{train}: ")
    assert damage in result.stderr and f"{train}: missing" not in result.stderr


def test_test_csv_that_is_a_symlink_loop_is_not_skipped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("id,scroll_id\nvol1,1\n")
    symlink_loop(data / "test.csv")
    with pytest.raises(UserError, match="test.csv: too many levels of symbolic links"):
        Dataset.open(data)


# --------------------------------------------------------------------------- pathological experiment files


HUGE = "a" * 5_000_000


@pytest.mark.parametrize("where", ["field value", "key", "plugin name", "extends", "spaced value"])
def test_a_huge_value_is_never_echoed_back(where, tmp_path, cwd, vlab_here):
    text = {
        "field value": EXPERIMENT + f'[train]\nepochs = "{HUGE}"\n',
        "key": EXPERIMENT + f"[train]\n{HUGE} = 1\n",
        "plugin name": f'name = "x"\n[model]\nplugin = "{HUGE}"\n',
        "extends": f'extends = "{HUGE}"\n' + EXPERIMENT,
        "spaced value": EXPERIMENT + f'[train]\nepochs = "{"a " * 2_500_000}"\n',
    }[where]
    path = tmp_path / "huge.toml"
    path.write_text(text)
    result = vlab_here(["validate", str(path)], cwd)
    assert_clear_failure(result, str(path))
    assert len(result.stderr) < 2000 and "…" in result.stderr, result.stderr[:3000]


def test_deep_nesting_given_with_set(tmp_path, cwd):
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT)
    deep = "[" * 1000 + "]" * 1000
    result = vlab_process(["validate", str(path), "--set", f"model.params.encoder={deep}"], cwd)
    assert_clear_failure(result, "--set model.params.encoder=[[[")
    assert "nested more than 64 levels deep" in result.stderr


def test_non_finite_params_of_a_third_party_plugin(tmp_path, cwd):
    """A plugin whose Params accept any float still never gets inf or nan from an experiment file."""
    site = tmp_path / "site"
    info = site / "vlab_nan_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlab-nan-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vesuvius_lab.losses]\nloose = vlab_nan_plugin:loose\n")
    (site / "vlab_nan_plugin.py").write_text(
        "from pydantic import BaseModel\nfrom vesuvius_lab.core.registry import plugin\n\n\n"
        "class Params(BaseModel, extra='forbid'):\n    gamma: float = 2.0\n    scales: list[float] = [1.0]\n\n\n"
        "@plugin(Params)\ndef loose(params, **context):\n    'Any float goes.'\n    return None\n")
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT + '[[loss]]\nplugin = "loose"\nparams = { gamma = nan, scales = [1.0, -inf] }\n')
    python_path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    result = vlab_process(["validate", str(path)], cwd, PYTHONPATH=python_path)
    assert_clear_failure(result, f"{path}:6: loss.0.params.gamma: nan is not a finite number")
    assert f"{path}:6: loss.0.params.scales.1: -inf is not a finite number" in result.stderr


# --------------------------------------------------------------------------- --set: blame the command line


TWO_LOSSES = EXPERIMENT + '[[loss]]\nplugin = "dice"\n[[loss]]\nplugin = "bce"\n[train]\nepochs = 3\n'


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=abc", "--set train.epochs=abc: train.epochs: Input should be a valid integer"),
    ("train.epochs=-1", "--set train.epochs=-1: train.epochs: Input should be greater than or equal to 1"),
    ("train.lr=inf", "--set train.lr=inf: train.lr: inf is not a finite number"),
    ("trian.epochs=3", '--set trian.epochs=3: trian: unknown key "trian". Did you mean "train"?'),
    ("data.window.0=5", "--set data.window.0=5: there is no list data.window in the experiment file"),
    ("loss.5.weight=1", "--set loss.5.weight=1: the list loss has 2 items (0 to 1), so there is no item 5"),
    ("loss.weight=1", "--set loss.weight=1: the list loss has 2 items (0 to 1)"),
    ("train.epochs", "--set train.epochs: expected KEY=VALUE"),
])
def test_a_bad_set_is_blamed_on_the_command_line(override, expected, tmp_path, cwd, vlab_here):
    path = tmp_path / "exp.toml"
    path.write_text(TWO_LOSSES)
    result = vlab_here(["validate", str(path), "--set", override], cwd)
    assert_clear_failure(result, expected)
    assert str(path) not in result.stderr  # not "exp.toml:1:", nor "exp.toml: sweep:"
