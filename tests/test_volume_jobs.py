"""Whole volumes on many processes: `--jobs N`, a job array through submitit's local executor, `--status`,
and the global pass on dask, each checked against one process or the chain in memory."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from test_large_volumes import SMALL, _blocks_done, _start, dilating_run, level, predict, scroll, volume  # noqa: F401
from vesuvius_lab.cli import main
from vesuvius_lab.core.inference.run_kinds import load_run

SLURM_OPTIONS = ["--chunk", "16", "--block", "16", "--support-mask", "none", "--probabilities"]
#: The global pass in chunks of 32: components cross chunk faces (the default, 256, holds these volumes whole).
PASS = ["--pass-chunk", "32"]


@pytest.fixture(scope="module")
def global_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run whose chain needs the whole volume: hysteresis, then a local dilation, dust
    removal and 3D hole filling."""
    copy = tmp_path_factory.mktemp("runs") / "tiny-global" / Path(tiny_run).name
    shutil.copytree(tiny_run, copy)
    spec = json.loads((copy / "spec.json").read_text())
    spec["name"], spec["postprocess"] = "tiny-global", [
        {"plugin": "threshold", "params": {"low": 0.3, "high": 0.6}},
        {"plugin": "dilate", "params": {"radius": 1}},
        {"plugin": "remove_small_components", "params": {"min_voxels": 40}},
        {"plugin": "fill_holes", "params": {"mode": "3d"}}]
    (copy / "spec.json").write_text(json.dumps(spec))
    return copy


@pytest.fixture(scope="module")
def whole(tiny_run, scroll, tmp_path_factory) -> Path:
    """What one process writes with SLURM_OPTIONS: the output that every run over many processes must equal.
    Module-shared: read it only."""
    out = tmp_path_factory.mktemp("whole") / "whole.zarr"
    assert predict(tiny_run, scroll, out, *SLURM_OPTIONS) == 0
    return out


def vlab(*args) -> int:
    try:
        main([str(arg) for arg in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_jobs_2_writes_the_output_of_one_process_bit_for_bit(dilating_run, scroll, tmp_path, capsys):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    assert predict(dilating_run, scroll, one, *SMALL) == 0
    assert predict(dilating_run, scroll, two, *SMALL, "--jobs", "2") == 0
    for index in range(6):
        assert np.array_equal(level(two, index), level(one, index)), index
    pids = {json.loads(p.read_text())["pid"] for p in (two / ".vlab" / "done").glob("*.json")}
    assert len(pids) == 2  # both workers took blocks
    capsys.readouterr()
    assert vlab("predict", "--status", two) == 0
    said = capsys.readouterr().out
    assert f"{_blocks_done(two)} done" in said and "0 failed, 0 left; complete" in said


def test_the_global_pass_equals_the_whole_volume_chain(global_run, scroll, volume, tmp_path, capsys):
    out = tmp_path / "global.zarr"
    assert predict(global_run, scroll, out, *SMALL, *PASS, "--jobs", "2") == 0
    assert "global pass" in capsys.readouterr().out
    predictor = load_run(global_run)
    probabilities = predictor.probabilities(volume)
    probabilities[volume == 0] = 0  # --support-mask auto
    expected = predictor.chain.apply(probabilities) * 255
    threshold_only = (probabilities > predictor.chain.threshold) * 255
    assert expected.any() and not np.array_equal(expected, threshold_only)  # the steps change something
    assert np.array_equal(level(out), expected)
    assert not (out / ".vlab" / "stage").exists()  # removed once complete
    assert predict(global_run, scroll, out, *SMALL, *PASS, "--resume") == 0
    assert "complete already" in capsys.readouterr().out


def test_a_bbox_through_the_global_pass_is_the_chain_on_the_box(global_run, scroll, volume, tmp_path):
    """Steps that need the whole volume see the box as the volume (what a user predicting an ROI asks for);
    the box's edges off the chunk grid are written by one task each."""
    out = tmp_path / "box.zarr"
    box = (slice(5, 37), slice(10, 61), slice(3, 50))
    assert predict(global_run, scroll, out, *SMALL, *PASS, "--bbox", "5:37,10:61,3:50") == 0
    predictor = load_run(global_run)
    probabilities = predictor.probabilities(volume)
    probabilities[volume == 0] = 0
    written = level(out)
    assert np.array_equal(written[box], predictor.chain.apply(probabilities[box]) * 255)
    outside = np.ones(written.shape, bool)
    outside[box] = False
    assert not written[outside].any()


def test_a_job_array_with_a_killed_task_resubmitted_equals_an_uninterrupted_run(tiny_run, scroll, whole, tmp_path,
                                                                                capsys):
    total = _blocks_done(whole)
    out = tmp_path / "array.zarr"
    command = [sys.executable, "-m", "vesuvius_lab", "--device", "cpu", "--runs", str(tmp_path / "runs"), "predict",
               str(tiny_run), "--input", str(scroll), "--output", str(out), *SLURM_OPTIONS,
               "--launcher", "submitit-local", "--jobs", "2"]
    process = _start(command)
    deadline = time.monotonic() + 300
    while _blocks_done(out) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]
    victim = json.loads(next((out / ".vlab" / "done").glob("*.json")).read_text())["pid"]
    import os

    os.kill(victim, signal.SIGKILL)  # one array task dies; the other finishes its range
    _, error = process.communicate(timeout=600)
    error = " ".join(error.split())
    assert process.returncode == 2 and "not done" in error and "--resume" in error, error
    left = total - _blocks_done(out)
    assert left > 0

    capsys.readouterr()
    assert vlab("predict", "--status", out) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"{left} left" in said and "last submission: 2 task(s)" in said and "--resume" in said

    resumed = run_cli([*command[3:], "--resume"])  # in this process: only the kill needed its own
    assert resumed.returncode == 0, resumed.stderr
    assert f"submitted {left} block(s)" in " ".join(resumed.stderr.split())
    for index in range(6):
        assert np.array_equal(level(out, index), level(whole, index)), index


def test_status_of_a_folder_that_is_no_output_is_a_message(tmp_path, capsys):
    assert vlab("predict", "--status", tmp_path) == 2
    assert "not an output of `vlab predict`" in capsys.readouterr().err


def test_predict_without_run_or_output_says_what_to_give(tmp_path, capsys):
    assert vlab("predict") == 2
    assert "give RUN, --input, --output" in " ".join(capsys.readouterr().err.split())


def test_ctrl_c_stops_every_worker_after_its_block_and_resume_completes_the_same_output(tiny_run, scroll, whole,
                                                                                        tmp_path):
    options = SLURM_OPTIONS
    out = tmp_path / "stopped.zarr"
    command = [sys.executable, "-m", "vesuvius_lab", "--device", "cpu", "predict", str(tiny_run), "--input", str(scroll),
               "--output", str(out), *options, "--jobs", "2"]
    process = _start(command)
    deadline = time.monotonic() + 300
    while _blocks_done(out) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGINT)  # to the parent alone: it passes the stop on to its workers
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130 and "--resume" in error, error
    workers = {json.loads(p.read_text())["pid"] for p in (out / ".vlab" / "done").glob("*.json")}
    assert len(workers) == 2 and not any(_alive(pid) for pid in workers)
    stopped = _blocks_done(out)
    assert stopped < _blocks_done(whole)
    assert predict(tiny_run, scroll, out, *options, "--jobs", "2", "--resume") == 0
    for index in range(6):
        assert np.array_equal(level(out, index), level(whole, index)), index


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not running
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_the_global_pass_runs_on_a_given_scheduler_and_an_unreachable_one_loses_no_block(global_run, scroll, volume,
                                                                                        tmp_path, capsys):
    """--dask ADDRESS: a real scheduler on 127.0.0.1 (a cluster of this test's own); before it, a closed port
    stops the command after the blocks with a message, and --resume then runs only the pass."""
    from distributed import LocalCluster

    from test_large_volumes import _closed_port

    out = tmp_path / "scheduled.zarr"
    assert predict(global_run, scroll, out, *SMALL, "--dask", f"tcp://127.0.0.1:{_closed_port()}") == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "no dask scheduler answers there" in error and "Traceback" not in error
    done = _blocks_done(out)
    assert done > 0 and (out / ".vlab" / "stage").is_dir()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        assert predict(global_run, scroll, out, *SMALL, *PASS, "--resume", "--dask", cluster.scheduler_address) == 0
    said = capsys.readouterr()
    assert f"{done} done before" in said.out + said.err
    predictor = load_run(global_run)
    probabilities = predictor.probabilities(volume)
    probabilities[volume == 0] = 0
    assert np.array_equal(level(out), predictor.chain.apply(probabilities) * 255)
