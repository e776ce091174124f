"""`vlab export`: an offline bundle installs into a fresh environment from its own wheels, with no package
index, and its predict.py writes the submission `vlab submit` writes here; `vlab submit`'s pace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from packaging.utils import canonicalize_name

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.launch.bundle import needed_distributions, read_have

#: What the target environment lacks, besides vesuvius-lab: a dependency of ours and one of its own.
MISSING = {"submitit", "cloudpickle"}
#: Bundled although the target has it: pip counts it as never installed (a standard library name).
PIP_HIDDEN = {"argparse"}
#: Not linked into the target: what it is to get from the bundle.
NOT_LINKED = {"vesuvius-lab"} | MISSING


def target_site(folder: Path) -> Path:
    """A folder of links to this environment's distributions but NOT_LINKED: the packages of a target
    environment (a Kaggle image, say) that has torch and most of our dependencies, but not all."""
    folder.mkdir()
    taken: set[str] = set()
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) in NOT_LINKED:
            taken |= {Path(f).parts[0] for f in dist.files or []}
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) in NOT_LINKED:
            continue
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - taken:
            link = folder / top
            if not link.exists() and Path(dist.locate_file(top)).exists():
                link.symlink_to(Path(dist.locate_file(top)))
    return folder


def test_have_lines_are_read_as_pip_freeze_writes_them(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text("# a comment\nTorch==2.5.1\nnumpy\nscikit_image==0.24.0 ; python_version > '3'\n-e git+x\n"
                    "rich @ file:///wheels/rich.whl\n")
    assert read_have(have) == {"torch": "2.5.1", "numpy": None, "scikit-image": "0.24.0", "rich": None}
    assert "zarr" in needed_distributions(read_have(None)).wheels  # not in the Kaggle image's usual packages
    bad = tmp_path / "bad.txt"
    bad.write_text("==1.0\n")
    with pytest.raises(UserError, match="cannot read the line"):
        read_have(bad)


def test_a_dependency_the_target_has_at_a_refused_version_is_bundled():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    have = {name: version for name, version in installed.items() if name not in NOT_LINKED}
    assert set(needed_distributions(have).wheels) == {"vesuvius-lab"} | MISSING | PIP_HIDDEN
    have["pydantic"] = "1.10.0"  # vesuvius-lab needs pydantic 2
    needed = needed_distributions(have)
    assert needed.wheels["pydantic"] == installed["pydantic"] and "pydantic" not in needed.present


@pytest.mark.slow
def test_a_bundle_installs_offline_in_a_fresh_environment_and_submits_as_here(tiny_run, synth_data, tmp_path):
    site = target_site(tmp_path / "site")
    venv = tmp_path / "target"
    # no pip of its own: the target image's packages, pip among them, are the links of `site`
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "target-image.pth").write_text(f"{site}\n")
    have = tmp_path / "have.txt"  # what the target has, as pip freeze there would list it
    have.write_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in metadata.distributions()
                            if canonicalize_name(d.metadata["Name"]) not in NOT_LINKED))

    bundle = tmp_path / "bundle"
    made = run_cli(["export", str(tiny_run), "--output", str(bundle), "--have", str(have)])
    assert made.returncode == 0, made.stderr
    record = json.loads((bundle / "bundle.json").read_text())
    assert set(record["bundled"]) == {"vesuvius-lab"} | MISSING | PIP_HIDDEN
    assert {re.split(r"-\d", name)[0].lower() for name in record["wheels"]} == {"vesuvius_lab", "submitit",
                                                                                "cloudpickle", "argparse"}
    assert (bundle / "runs" / record["predict_with"] / "checkpoints" / "best.pt").is_file()
    assert not (bundle / "runs" / record["predict_with"] / "checkpoints" / "last.pt").exists()
    assert json.loads((bundle / "predict.ipynb").read_text())["nbformat"] == 4

    here = tmp_path / "here.zip"
    assert run_cli(["submit", str(tiny_run), "--input", str(synth_data / "test_images"), "--output",
                    str(here)]).returncode == 0
    offline = tmp_path / "offline.zip"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "VLAB_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([python, bundle / "predict.py", "--input", synth_data / "test_images", "--output",
                             offline], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    installed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], env=env, capture_output=True,
                               text=True, check=True).stdout
    assert {canonicalize_name(row["name"]) for row in json.loads(installed)} >= {"vesuvius-lab"} | MISSING
    with zipfile.ZipFile(here) as ours, zipfile.ZipFile(offline) as theirs:
        assert sorted(ours.namelist()) == sorted(theirs.namelist())
        for name in ours.namelist():
            assert ours.read(name) == theirs.read(name), name


def test_export_refuses_a_folder_that_holds_something(tiny_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = run_cli(["export", str(tiny_run), "--output", str(tmp_path / "full"), "--no-wheels"])
    assert result.returncode == 2 and "not an empty folder" in result.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert run_cli(["export", str(tiny_run), "--output", str(tmp_path / "runs-only"), "--no-wheels"]).returncode == 0
    record = json.loads((tmp_path / "runs-only" / "bundle.json").read_text())
    assert record["wheels"] == [] and record["bundled"] == {} and len(record["runs"]) == 1


def test_submit_says_its_pace_and_what_the_test_set_would_take(tiny_run, synth_data, tmp_path):
    result = run_cli(["submit", str(tiny_run), "--input", str(synth_data / "test_images"), "--output",
                      str(tmp_path / "s.zip"), "--expect", "120"])
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    assert re.search(r"\(2 volumes, \d+\.\d\d s per volume; 120 volumes would take \d+ (s|min \d\d s) at this "
                     r"pace\)", said), said
