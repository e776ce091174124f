"""``vlab export``: an offline bundle, what a notebook without internet (Kaggle's) needs to predict.

A bundle is a folder to upload as one dataset::

    runs/<experiment>/<run id>/   the runs given and every run they predict through (an ensemble's
                                  members, a tuning run's sources), without what only training needs
    wheels/                       vesuvius-lab's wheel and one per dependency the target lacks, at the
                                  versions installed here (what was tested)
    predict.py, predict.ipynb     install from wheels/ with --no-index, then `vlab submit`
    bundle.json                   what is in it and why

The target's packages are given with ``--have`` (a ``pip freeze`` of the target, or names only, which are
taken as present at any version); the default is :data:`KAGGLE_HAVE`. A dependency the target has at a
version our requirement refuses is bundled too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.run_kinds import referenced_runs
from vesuvius_lab.core.runs.folder import Run

DISTRIBUTION = "vesuvius-lab"
#: The Kaggle GPU notebook image's packages that vesuvius-lab needs, by name (any version taken as fine):
#: the scientific stack that image has long shipped. Not a record of one image: for an exact list, run
#: `pip freeze > have.txt` in a notebook there and give it with --have.
KAGGLE_HAVE = ("torch", "torchvision", "numpy", "scipy", "scikit-image", "scikit-learn", "pandas", "matplotlib",
               "pillow", "networkx", "sympy", "jinja2", "filelock", "fsspec", "typing-extensions", "packaging",
               "pyyaml", "requests", "tqdm", "rich", "click", "pydantic", "numba", "llvmlite", "tifffile",
               "imageio", "optuna", "sqlalchemy", "alembic", "tensorboard", "protobuf", "grpcio", "aiohttp",
               "dask", "cloudpickle", "toolz", "psutil", "h5py", "nibabel", "seaborn", "six", "setuptools", "wheel")
#: Run files prediction never reads: resuming (the last checkpoint), tuning's study, nnU-Net's data views.
LEFT_OUT = ("checkpoints/last.pt", "study.db", "backend/nnUNet_raw", "backend/nnUNet_preprocessed", "lock")


def read_have(path: Path | None) -> dict[str, str | None]:
    """name -> version (None: any) of what the target has: ``name==version`` lines (pip freeze), or names."""
    if path is None:
        return {canonicalize_name(name): None for name in KAGGLE_HAVE}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UserError(f"--have {path}: cannot read it ({exc.strerror or exc}). Give a `pip freeze` of the target "
                        "environment, one package per line.") from None
    have: dict[str, str | None] = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:(?:===?|@)\s*(\S+))?", line)
        if not match:
            raise UserError(f"--have {path}: cannot read the line {line!r}. Lines are `name==version` (as pip "
                            "freeze writes them) or a name.")
        version = match.group(2)
        have[canonicalize_name(match.group(1))] = version if version and re.match(r"^\d", version) else None
    return have


@dataclass
class Needed:
    """The distributions to bundle (name -> installed version) and why each of the others was left out."""

    wheels: dict[str, str] = field(default_factory=dict)
    present: dict[str, str] = field(default_factory=dict)  # name -> why it is not bundled


#: Distributions pip never counts as installed (it takes them for the standard library's modules): wherever one
#: is required, pip wants its wheel, even by a package the target has.
PIP_HIDDEN = frozenset({"argparse", "wsgiref"})


def needed_distributions(have: dict[str, str | None]) -> Needed:
    """Walk vesuvius-lab's requirements (and theirs) through the installed distributions: each one the target
    lacks, or has at a version the requirement refuses, is bundled at the version installed here (and its own
    requirements walked in turn); one the target has is left to it, and below it only what pip cannot see
    installed (:data:`PIP_HIDDEN`) is bundled."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    needed = Needed()
    queue: list[tuple[str, Requirement | None, frozenset[str], bool]] = [(DISTRIBUTION, None, frozenset(), False)]
    seen: set[tuple[str, frozenset[str], bool]] = set()
    while queue:
        name, requirement, extras, below_present = queue.pop()
        key = canonicalize_name(name)
        if (key, extras, below_present) in seen:
            continue
        seen.add((key, extras, below_present))
        present = False
        if key in PIP_HIDDEN:
            pass
        elif below_present or (key in have and key != canonicalize_name(DISTRIBUTION)):
            version = have.get(key)
            try:
                present = version is None or requirement is None or Version(version) in requirement.specifier
            except InvalidVersion:
                present = False
            present = present or below_present  # the target's own packages bring their requirements
            if present and key not in needed.wheels:
                needed.present[key] = "the target has it" if version is None else f"the target has {version}"
        try:
            installed = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if present:
                continue  # the target's affair: nothing of it is needed from here
            raise UserError(f"{name} ({requirement}) is not installed here, so its wheel cannot be bundled at a "
                            "tested version. Install vesuvius-lab's dependencies (make setup), then export.") from None
        if not present:
            needed.wheels[key] = installed.version
            needed.present.pop(key, None)
        for text in installed.requires or []:
            dependency = Requirement(text)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": extra})
                                                for extra in ("", *extras)):
                queue.append((dependency.name, dependency, frozenset(dependency.extras), present))
    return needed


def source_tree() -> Path:
    """The folder vesuvius-lab is installed from (its pyproject.toml), to build its wheel."""
    direct = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    url = json.loads(direct).get("url", "") if direct else ""
    folder = Path(url.removeprefix("file://")) if url.startswith("file://") else Path(__file__).resolve().parents[3]
    if not (folder / "pyproject.toml").is_file():
        raise UserError("vlab export builds vesuvius-lab's wheel from its source folder, and this installation has "
                        "none (it was installed from a wheel). Install it from a clone with `pip install -e .`.")
    return folder


def run_closure(runs: list[Run]) -> list[Run]:
    """The runs given and every run they predict through, each once."""
    found: dict[Path, Run] = {}
    pending = [run.path.resolve() for run in runs]
    while pending:
        path = pending.pop(0)
        if path in found:
            continue
        found[path] = Run(path)
        pending += referenced_runs(found[path])
    return list(found.values())


def _copy_run(run: Run, runs_dir: Path) -> Path:
    target = runs_dir / run.experiment / run.id
    left_out = {run.path / name for name in LEFT_OUT}
    shutil.copytree(run.path, target, ignore=lambda folder, names: [
        name for name in names if Path(folder) / name in left_out or name.startswith(".")])
    return target


def _pip(arguments: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{what} failed (pip {' '.join(arguments[:2])} ...):\n{result.stderr.strip()[-2000:]}\n"
                        "pip needs the package index (or --find-links) to fetch wheels: export on a machine "
                        "online, then upload the bundle.")


PREDICT = '''"""Predict offline with the runs of this bundle: install vesuvius-lab from wheels/ (no internet needed),
then write the competition's submission.zip. Written by `vlab export`.

    python predict.py                                   # Kaggle's paths
    python predict.py --input test_images --output submission.zip
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent
RUN = {run!r}
KAGGLE_INPUT = "/kaggle/input/vesuvius-challenge-surface-detection/test_images"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default=KAGGLE_INPUT, help="the test_images folder (default: %(default)s)")
parser.add_argument("--output", default="/kaggle/working/submission.zip" if Path("/kaggle/working").is_dir()
                    else "submission.zip", help="the zip to write (default: %(default)s)")
parser.add_argument("--run", default=RUN, help="the run to predict with, as <experiment>/<run id> (default: %(default)s)")
args = parser.parse_args()

subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                str(BUNDLE / "wheels"), "vesuvius-lab"], check=True)
with tempfile.TemporaryDirectory() as scratch:  # the bundle may be read-only (a Kaggle dataset)
    runs = Path(scratch) / "runs"
    shutil.copytree(BUNDLE / "runs", runs)
    command = [sys.executable, "-m", "vesuvius_lab", "--runs", str(runs), "submit", str(runs / args.run),
               "--input", args.input, "--output", args.output]
    sys.exit(subprocess.run(command).returncode)
'''


def _notebook() -> str:
    cell = ("# Predict offline with a vesuvius-lab bundle (a Kaggle dataset): its predict.py installs\n"
            "# vesuvius-lab from the bundle's wheels and writes /kaggle/working/submission.zip.\n"
            "import glob, subprocess, sys\n"
            "(script,) = glob.glob('/kaggle/input/*/predict.py')\n"
            "subprocess.run([sys.executable, script], check=True)\n")
    return json.dumps({"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                                  "source": cell.splitlines(keepends=True)}],
                       "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                                    "language_info": {"name": "python"}},
                       "nbformat": 4, "nbformat_minor": 5}, indent=1) + "\n"


def export_bundle(runs: list[Run], output: Path, have: dict[str, str | None], *, wheels: bool = True,
                  log=lambda line: None) -> dict:
    """Write the bundle of ``runs`` into ``output`` (which must not exist, or be empty); returns its record."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output}: it exists and is not an empty folder. Give a new folder (a bundle is "
                        "written whole, nothing in it is kept).")
    closure = run_closure(runs)
    needed = needed_distributions(have) if wheels else Needed()
    source = source_tree() if wheels else None
    staging = output.with_name(output.name + ".partial")  # renamed to the output once whole
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "wheels").mkdir(parents=True)
        copied = [str(_copy_run(run, staging / "runs").relative_to(staging / "runs")) for run in closure]
        log(f"copied {len(copied)} run(s): {', '.join(copied)}")
        if source is not None:
            log(f"building vesuvius-lab's wheel from {source}")
            _pip(["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(staging / "wheels"),
                  str(source)], "building vesuvius-lab's wheel")
        others = [f"{name}=={version}" for name, version in sorted(needed.wheels.items()) if name != DISTRIBUTION]
        if others:
            log(f"fetching {len(others)} wheel(s) the target lacks: {', '.join(others)}")
            _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", str(staging / "wheels"), *others],
                 "fetching the dependencies' wheels")
        (staging / "predict.py").write_text(PREDICT.replace("{run!r}", repr(copied[0])))
        (staging / "predict.ipynb").write_text(_notebook())
        record = {"runs": copied, "predict_with": copied[0], "python": sys.version.split()[0],
                  "wheels": sorted(p.name for p in (staging / "wheels").glob("*.whl")),
                  "bundled": needed.wheels, "not_bundled": needed.present}
        (staging / "bundle.json").write_text(json.dumps(record, indent=1) + "\n")
    except BaseException:  # nothing half-made is left beside the output
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        output.rmdir()
    staging.rename(output)
    return record
