"""Fixtures shared by the test suite."""

from __future__ import annotations

import os

# `make test` runs two workers on a machine of two cores, each training with torch's OpenMP threads: a
# thread that spins while it waits for a core the other worker holds burns that core (two tiny trainings at
# once took 28 s spinning, 19 s sleeping). Under pytest-xdist the workers' threads, and those of every
# process they start, sleep instead. Set before anything loads OpenMP; serial runs keep the default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vesuvius_lab.core.runs.folder import Run, find_runs

#: Official scores and Betti counts of the conformance cases, and the cases' arrays.
CONFORMANCE = Path(__file__).parent / "data" / "conformance"


def conformance_expected(stem: str) -> dict:
    """The "cases" of ``<stem>_expected.json`` (e.g. "metric", "betti_tile")."""
    return json.loads((CONFORMANCE / f"{stem}_expected.json").read_text())["cases"]


def conformance_arrays(stem: str) -> dict[str, np.ndarray]:
    """Every array of ``<stem>_cases.npz``, keyed ``<case>__<part>``."""
    with np.load(CONFORMANCE / f"{stem}_cases.npz") as data:
        return {key: data[key] for key in data.files}


#: Seconds the slowest test files take under `make test` (2 workers on 2 cores). `make test` runs the suite
#: in pytest-xdist workers, each given one whole file at a time in collection order; these files are
#: collected first, longest first, so that no worker is left running a long file at the end while
#: the other idles. Order within a file, and of every other file, is unchanged.
SLOWEST_FILES = {"test_faults.py": 145, "test_launch.py": 125, "test_volume_jobs.py": 126, "test_train.py": 69,
                 "test_third_party_plugins.py": 56, "test_large_volumes.py": 49, "test_tune.py": 48,
                 "test_signals.py": 39, "test_orphans.py": 36, "test_nnunet.py": 36, "test_docs.py": 33,
                 "test_gpu_check.py": 30, "test_export.py": 12, "test_models.py": 12, "test_tables.py": 10}


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: index for index, name in enumerate(sorted(SLOWEST_FILES, key=SLOWEST_FILES.get, reverse=True))}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


SYNTH = {"n": 6, "shape": (32, 48, 48), "seed": 0, "scrolls": 3, "n_test": 2}


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the competition layout: 6 training volumes of 32x48x48 over 3
    scrolls and 2 test volumes. Shared by the whole session: copy it before changing anything."""
    from vesuvius_lab.core.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth") / "data", progress=False, **SYNTH)


def tiny_experiment(name: str = "tiny", *, epochs: int = 1, iterations: int = 2) -> str:
    """TOML of a 2.5D UNet small enough to train in seconds on ``synth_data`` (default losses: Dice + BCE)."""
    return f"""
name = "{name}"
[data]
window = [8, 32, 32]
folds = 3
[model]
plugin = "smp_unet25d"
params = {{ encoder = "resnet18", encoder_depth = 3, decoder_channels = [16, 8, 8] }}
[train]
epochs = {epochs}
iterations_per_epoch = {iterations}
batch_size = 2
workers = 0
lr = 0.003
[inference]
overlap = 0.25
batch_size = 8
"""


@pytest.fixture(scope="session")
def tiny_run(synth_data, tmp_path_factory) -> Path:
    """A finished run of a tiny 2.5D UNet on ``synth_data`` (1 epoch, 2 iterations), for prediction tests.
    Session-shared: do not change it."""
    from vesuvius_lab.core.config.experiment import load_experiment
    from vesuvius_lab.core.config.project import load_project
    from vesuvius_lab.core.training.trainer import train

    root = tmp_path_factory.mktemp("tiny-run")
    (root / "tiny.toml").write_text(tiny_experiment())
    (root / "vesuvius.toml").write_text(f'data_root = "{synth_data}"\nruns_dir = "runs"\ndevice = "cpu"\n')
    project = load_project(root / "vesuvius.toml")
    return train(load_experiment(root / "tiny.toml"), project).path


@pytest.fixture(scope="session")
def nnunet_data(tmp_path_factory) -> tuple[Path, Path]:
    """(data, cache): test_nnunet's tiny dataset and one nnU-Net preprocessing cache for the session. nnU-Net
    plans and preprocesses a dataset once per content; every nnU-Net run of the suite reuses it."""
    from test_nnunet import write_tiny_dataset

    root = tmp_path_factory.mktemp("nnunet")
    return write_tiny_dataset(root / "data"), root / "cache"


# --------------------------------------------------------------------------- training in a subprocess


def experiment(tmp_path: Path, epochs: int = 2, iterations: int = 4) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_experiment(epochs=epochs, iterations=iterations))
    return path


def run_cli(args: list, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`vlab ARGS` run inside this process, as a CompletedProcess of its exit status, stdout and stderr.

    The suite's way to run a command whose subject is what it does, not how its process starts, stops or
    dies: a subprocess would import torch, MONAI and SMP again (about 10 s), this costs nothing. The
    environment (``env`` added), the working directory and the signal handlers are the call's only. An
    exception that is not a user's mistake propagates, as the traceback a subprocess would print. Output
    that child processes (workers, ranks) write goes to the test's own capture, not into the result."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from vesuvius_lab.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = StringIO(), StringIO()
    os.environ.update(env)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main([str(arg) for arg in args])
                code = 0
            except SystemExit as stopped:
                code = stopped.code if isinstance(stopped.code, int) else (0 if stopped.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["vlab", *map(str, args)], code, out.getvalue(), err.getvalue())


def vlab_process(args: list, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`vlab ARGS` in a process of its own (one thread, ``env`` added): for what only a real process shows,
    e.g. a PYTHONPATH, a crash, the terminal's width."""
    return subprocess.run([sys.executable, "-m", "vesuvius_lab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def vlab(args: list[str], data: Path, runs: Path) -> subprocess.CompletedProcess:
    """`vlab ARGS` in this process (``run_cli``) on the data folder ``data`` and the runs folder ``runs``."""
    return run_cli(args, VLAB_DATA=str(data), VLAB_RUNS=str(runs))


def start_vlab(args: list[str], data: Path, runs: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "VLAB_DATA": str(data), "VLAB_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vesuvius_lab", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def vlab_here():
    """``vlab_here(args, cwd=None, **env)``: ``run_cli`` as a fixture (VLAB_DATA and VLAB_RUNS unset unless
    given: the call's environment is its own)."""
    return lambda args, cwd=None, **env: run_cli(args, cwd, **{"VLAB_DATA": "", "VLAB_RUNS": "", **env})


def only_run(runs: Path) -> Run:
    (run,) = find_runs(runs)
    return run


def wait_for_epochs(run_parent: Path, epochs: int, process: subprocess.Popen, timeout: float = 300) -> Run:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = find_runs(run_parent)
        if runs and len(runs[0].metrics()) >= epochs:
            return runs[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("training did not reach the epoch in time")


def copy_run(run: Run, runs: Path) -> Run:
    """A copy of ``run`` in the runs folder ``runs`` (same experiment and id), free to resume or damage."""
    target = runs / run.experiment / run.id
    shutil.copytree(run.path, target)
    return Run(target)


#: The experiment of ``killed_run``: three epochs of a few iterations, so that epochs 2 and 3 leave time
#: to kill the process in, and resuming it stays cheap.
KILLED = {"epochs": 3, "iterations": 8}


@pytest.fixture(scope="session")
def killed_run(synth_data, tmp_path_factory) -> Run:
    """A run of ``experiment(folder, **KILLED)`` whose `vlab train` process got SIGKILL once epoch 1 was
    recorded (epoch 2 had just begun). Session-shared: resume or damage a ``copy_run`` of it."""
    root = tmp_path_factory.mktemp("killed")
    process = start_vlab(["train", str(experiment(root, **KILLED))], synth_data, root / "runs")
    try:
        run = wait_for_epochs(root / "runs", 1, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert len(run.metrics()) < KILLED["epochs"] and (run.checkpoints / "last.pt").is_file()
    return run
