"""One set of checks for every command, one cause one message, no silent substitutes, partial work said.

Every bad experiment file of tests/bad_inputs/ is refused by `vlab validate`, `train`, `tune`,
`ensemble` and `run` with the same messages and exit status 2, before anything is created; `--set` on a
run (`predict`, `submit`) is checked as `validate` checks a file. The CLI is called in-process
(`vesuvius_lab.cli.main`), which is what `vlab` runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import tiny_experiment

from vesuvius_lab.cli import main
from vesuvius_lab.core.config.checked import read_experiment
from vesuvius_lab.core.config.experiment import SpecError, load_experiment
from vesuvius_lab.core.runs.folder import Run, find_runs
from vesuvius_lab.core.runs.summary import write_summary

BAD = Path(__file__).parent / "bad_inputs"
CORPUS = sorted(BAD.glob("*.toml"))
COMMANDS = ["train", "tune", "ensemble", "run"]


def vlab(args: list[str], capsys, project: Path) -> tuple[int, str]:
    """Run the CLI in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        main(["--project", str(project), *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def problems(stderr: str) -> list[str]:
    """The problem lines of a command's stderr, whatever the command: `validate` and `run` print
    "error <problem>" per problem and then a count, the others "error: <problem>" and the rest on the
    next lines."""
    found = []
    for line in stderr[stderr.index("error"):].splitlines():
        if re.match(r"\d+ (problem\(s\) in|run\(s\) planned)", line):
            break
        if line.startswith(("error: ", "error ")):
            line = line.split(" ", 1)[1]
        if line.strip():
            found.append(line.rstrip())
    return found


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "vesuvius.toml").write_text(f'data_root = "{tmp_path / "data"}"\nruns_dir = "runs"\n'
                                            'device = "cpu"\n')
    return tmp_path / "vesuvius.toml"


# --------------------------------------------------------------------------- 1. one set of checks


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_every_command_refuses_a_bad_file_as_validate_does(path, project, capsys):
    code, stderr = vlab(["validate", str(path)], capsys, project)
    assert code == 2 and "Traceback" not in stderr
    expected = problems(stderr)
    assert expected
    for command in COMMANDS:
        code, stderr = vlab([command, str(path)], capsys, project)
        assert code == 2, (command, stderr)
        assert "Traceback" not in stderr
        assert problems(stderr) == expected, command
    assert not (project.parent / "runs").exists()  # no run folder, so nothing new on the leaderboard


def test_a_bad_set_is_refused_by_every_command_with_validates_message(project, capsys, tmp_path):
    file = tmp_path / "good.toml"
    file.write_text(tiny_experiment())
    bad = "inference.overlap=1.0"
    code, stderr = vlab(["validate", str(file), "--set", bad], capsys, project)
    assert code == 2
    (expected,) = problems(stderr)
    assert expected.startswith(f"--set {bad}: inference.overlap:")
    for command in ("train", "tune", "run", "postprocess"):
        extra = ["--input", str(tmp_path), "--output", str(tmp_path / "out")] if command == "postprocess" else []
        code, stderr = vlab([command, str(file), "--set", bad, *extra], capsys, project)
        assert code == 2 and problems(stderr) == [expected], command
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_predict_and_submit_check_set_as_validate_checks_a_file(tiny_run, synth_data, project, capsys, tmp_path):
    file = tmp_path / "good.toml"
    file.write_text(tiny_experiment())
    for bad in ("inference.overlap=1.0", "inference.tta=['bogus']", "inference.blend={plugin='gausian'}",
                "inference.overlap=nan"):
        code, stderr = vlab(["validate", str(file), "--set", bad], capsys, project)
        assert code == 2
        (expected,) = problems(stderr)
        for command in (["predict", str(tiny_run), "--output", str(tmp_path / "out")],
                        ["submit", str(tiny_run), "--output", str(tmp_path / "s.zip")]):
            code, stderr = vlab([*command, "--input", str(synth_data / "test_images"), "--set", bad], capsys, project)
            assert code == 2 and problems(stderr) == [expected], (command, bad)
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.zip").exists()


def test_the_single_entry_is_what_commands_use():
    """No command reads an experiment file around the checks: only the entry calls load_experiment."""
    package = Path(__file__).parent.parent / "vesuvius_lab"
    allowed = {"core/config/experiment.py", "core/config/checked.py", "core/config/sweep.py",
               "core/tuning/tuner.py"}  # the tuner re-reads the file it wrote itself
    users = {str(p.relative_to(package)) for p in package.rglob("*.py") if "load_experiment(" in p.read_text()}
    assert users <= allowed, users - allowed


def test_a_bad_nnunet_init_is_refused_before_any_planning(project, capsys, tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"not weights at all")
    (tmp_path / "empty.pth").write_bytes(b"")
    for weights, reason in (("weights.pth", "not a torch checkpoint"), ("empty.pth", "the file is empty")):
        file = tmp_path / "nn.toml"
        file.write_text(f'name = "nn"\n[model]\nplugin = "nnunet"\n[train]\ninit = "{tmp_path / weights}"\n')
        for command in ("validate", "train"):
            code, stderr = vlab([command, str(file)], capsys, project)
            assert code == 2 and reason in stderr and "train.init" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- 3. one cause, one message


def test_a_broken_parent_is_reported_once(tmp_path):
    (tmp_path / "base.toml").write_text('name = "b"\n[model\nplugin = "smp_unet25d"\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[train]\nepochs = 2\n')
    (tmp_path / "missing.toml").write_text('extends = "nowhere.toml"\n[train]\nepochs = 2\n')
    for file, words in (("child.toml", "TOML syntax error"), ("missing.toml", 'parent file "nowhere.toml" not found')):
        with pytest.raises(SpecError) as caught:
            read_experiment(tmp_path / file)
        (problem,) = caught.value.problems  # not one more per key the parent would have set
        assert words in problem.message


def test_a_child_that_switches_plugin_does_not_inherit_the_parents_params(tmp_path):
    (tmp_path / "base.toml").write_text('name = "b"\n[model]\nplugin = "smp_unet25d"\n'
                                        'params = { encoder = "resnet18", encoder_depth = 3, '
                                        'decoder_channels = [16, 8, 8] }\n'
                                        '[inference.blend]\nplugin = "gaussian"\nparams = { sigma_scale = 0.2 }\n')
    (tmp_path / "monai.toml").write_text('extends = "base.toml"\n[model]\nplugin = "monai_unet"\n'
                                         '[inference.blend]\nplugin = "mean"\n')
    spec = read_experiment(tmp_path / "monai.toml").spec
    assert spec.model.plugin == "monai_unet" and spec.model.params == {}
    assert spec.inference.blend.plugin == "mean" and spec.inference.blend.params == {}
    (tmp_path / "same.toml").write_text('extends = "base.toml"\n[model]\nparams = { encoder = "resnet34" }\n')
    same = load_experiment(tmp_path / "same.toml").spec  # the same plugin: params still merge key by key
    assert same.model.params == {"encoder": "resnet34", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("cp1252", "it looks like")])
def test_text_that_is_not_utf8_says_what_it_looks_like(tmp_path, encoding, name):
    file = tmp_path / "e.toml"
    file.write_bytes('name = "x"\n# Größe, Straße, déjà vu, façade, naïve, œuvre\n'.encode(encoding))
    with pytest.raises(SpecError) as caught:
        read_experiment(file)
    (problem,) = caught.value.problems
    assert "not UTF-8 text" in problem.message and name in problem.message
    assert "iconv -f" in problem.message and "-t UTF-8" in problem.message


def test_a_resumed_and_finished_run_keeps_no_stale_error(tmp_path):
    run = Run(tmp_path / "x" / "fold0-1")
    run.path.mkdir(parents=True)
    spec = load_experiment_from_text(tmp_path)
    run.set_status("failed", error="RuntimeError: out of memory")
    run.set_status("interrupted", signal="SIGTERM")
    assert "error" not in run.read("status.json") and run.read("status.json")["signal"] == "SIGTERM"
    run.set_status("running", epoch=3)
    write_summary(run, spec, wall_time=1.0, parameters=None, epochs_done=3, best_epoch=3, kind="model")
    status = run.read("status.json")
    assert status["state"] == "finished" and status["epoch"] == 3
    assert not {"error", "signal"} & set(status) and "error" not in run.read("summary.json")


def load_experiment_from_text(folder: Path):
    (folder / "t.toml").write_text(tiny_experiment())
    return load_experiment(folder / "t.toml").spec


# --------------------------------------------------------------------------- 4. no silent substitutes


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "tiny" / run.name
    shutil.copytree(run, copy)
    return copy


def test_a_missing_best_checkpoint_is_an_error_naming_the_last(tiny_run, synth_data, project, capsys, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "checkpoints" / "best.pt").unlink()
    for command in (["predict", str(run), "--output", str(tmp_path / "out")],
                    ["submit", str(run), "--output", str(tmp_path / "s.zip")]):
        code, stderr = vlab([*command, "--input", str(synth_data / "test_images")], capsys, project)
        assert code == 2 and "best.pt: missing" in stderr and "--checkpoint last" in stderr, stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.zip").exists()
    code, stderr = vlab(["predict", str(run), "--input", str(synth_data / "test_images"), "--output",
                         str(tmp_path / "out"), "--checkpoint", "last"], capsys, project)
    assert code == 0, stderr
    assert len(list((tmp_path / "out").glob("*.tif"))) == len(list((synth_data / "test_images").glob("*.tif")))
    (run / "checkpoints" / "last.pt").write_bytes(b"\x00" * 10)  # damaged: the other one is named, not used
    code, stderr = vlab(["predict", str(run), "--input", str(synth_data / "test_images"), "--output",
                         str(tmp_path / "out2"), "--checkpoint", "last"], capsys, project)
    assert code == 2 and "last.pt: not a readable vesuvius-lab checkpoint" in stderr
    assert "no other checkpoint" in stderr and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("record, damage", [("status.json", "{\"state\": "), ("spec.json", "[1, 2]")])
def test_run_refuses_to_replace_a_run_whose_records_are_damaged(tiny_run, synth_data, capsys, tmp_path, record,
                                                                damage):
    run = copy_run(tiny_run, tmp_path)
    (run / record).write_text(damage)
    (tmp_path / "tiny.toml").write_text(tiny_experiment())
    (tmp_path / "vesuvius.toml").write_text(f'data_root = "{synth_data}"\nruns_dir = "runs"\ndevice = "cpu"\n')
    code, stderr = vlab(["run", str(tmp_path / "tiny.toml")], capsys, tmp_path / "vesuvius.toml")
    assert code == 2 and "Traceback" not in stderr
    assert f"{run / record}: damaged" in " ".join(stderr.split()) and "--force" in stderr
    assert [r.path for r in find_runs(tmp_path / "runs")] == [run]  # nothing new started


# --------------------------------------------------------------------------- 5. partial work is said


def bad_folder(synth_data: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    shutil.copytree(synth_data / "test_images", folder)
    first = sorted(folder.glob("*.tif"))[0].read_bytes()
    (folder / "zz_truncated.tif").write_bytes(first[:len(first) // 2])
    (folder / "yy_text.tif").write_text("not a tiff")
    tifffile.imwrite(folder / "xx_float.tif", np.zeros((32, 48, 48), np.float32))
    tifffile.imwrite(folder / "ww_flat.tif", np.zeros((48, 48), np.uint8))
    return folder


def test_predict_and_submit_check_every_input_before_writing(tiny_run, synth_data, project, capsys, tmp_path):
    folder = bad_folder(synth_data, tmp_path)
    for command in (["predict", str(tiny_run), "--output", str(tmp_path / "out")],
                    ["submit", str(tiny_run), "--output", str(tmp_path / "s.zip")]):
        code, stderr = vlab([*command, "--input", str(folder)], capsys, project)
        text = " ".join(stderr.split())
        assert code == 2 and "4 of 6 input file(s) cannot be used, so nothing was written" in text
        for name, why in (("zz_truncated.tif", "truncated"), ("yy_text.tif", "cannot read this TIFF"),
                          ("xx_float.tif", "expected uint8 voxels, found float32"), ("ww_flat.tif", "3D volume")):
            assert f"{folder / name}: " in text and why in text, (name, text)
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.zip").exists()


def test_postprocess_checks_headers_first_and_says_what_it_wrote(project, capsys, tmp_path):
    file = tmp_path / "e.toml"
    file.write_text(tiny_experiment())
    folder = tmp_path / "probabilities"
    folder.mkdir()
    for name in ("a", "b", "c"):
        tifffile.imwrite(folder / f"{name}.tif", np.full((8, 16, 16), 0.7, np.float32))
    tifffile.imwrite(folder / "b.tif", np.full((8, 16, 16), 3.0, np.float32))  # decodes, but not probabilities
    code, stderr = vlab(["postprocess", str(file), "--input", str(folder), "--output", str(tmp_path / "out")],
                        capsys, project)
    text = " ".join(stderr.split())
    assert code == 2 and "b.tif: float voxels are read as probabilities" in text
    assert "1 of 3 mask(s) written (a.tif); not written: b.tif, c.tif" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tif"]
    (folder / "d.tif").write_text("not a tiff")  # unreadable: found before anything is written
    code, stderr = vlab(["postprocess", str(file), "--input", str(folder), "--output", str(tmp_path / "out2")],
                        capsys, project)
    assert code == 2 and "1 of 4 input file(s) cannot be used, so nothing was written" in stderr
    assert not (tmp_path / "out2").exists()


def leaderboard(project: Path, capsys) -> dict:
    capsys.readouterr()
    try:
        main(["--project", str(project), "leaderboard", "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return json.loads(capsys.readouterr().out)


def test_refused_commands_leave_the_leaderboard_as_it_was(tiny_run, synth_data, capsys, tmp_path):
    copy_run(tiny_run, tmp_path)
    (tmp_path / "vesuvius.toml").write_text(f'data_root = "{synth_data}"\nruns_dir = "runs"\ndevice = "cpu"\n')
    project = tmp_path / "vesuvius.toml"
    before = leaderboard(project, capsys)
    assert [row["experiment"] for row in before["rows"]] == ["tiny"]
    for path in (BAD / "tune_untunable_key.toml", BAD / "sweep_value_refused.toml", BAD / "infinite_lr.toml"):
        for command in COMMANDS:
            assert vlab([command, str(path)], capsys, project)[0] == 2
    assert len(find_runs(tmp_path / "runs")) == 1
    assert leaderboard(project, capsys) == before
