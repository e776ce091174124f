"""Faults a long job meets: a kill mid-write, a dying DDP rank, a full disk, two runs at once."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import tiny_experiment

from vesuvius_lab.core import checkpoint
from vesuvius_lab.core.runs.folder import effective_state, find_runs
from vesuvius_lab.core.training import distributed

WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from vesuvius_lab.core import checkpoint
    path = Path(sys.argv[1])
    step = 0
    while True:
        step += 1
        checkpoint.save(path, {"model": {"w": torch.full((4_000_000,), float(step))}, "model_plugin": "x",
                               "epoch": step})
        print(step, flush=True)
""")


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    for attempt in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # one complete checkpoint exists
        time.sleep(0.05 + 0.07 * attempt)  # somewhere inside a later write
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        state = checkpoint.load(path)
        assert torch.all(state["model"]["w"] == state["epoch"])  # complete, not a mix of two writes
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.") for name in leftovers)  # only temporaries, never read


def _one_rank_dies(rank: int, world_size: int, port: int) -> None:
    distributed.init(rank, world_size, "cpu", port)
    if rank == 1:
        os._exit(3)
    distributed.barrier()  # would wait for rank 1 forever without the spawn watchdog


@pytest.mark.timeout(180)
def test_a_dying_rank_stops_the_others():
    with pytest.raises(distributed.RankFailed) as info:
        distributed.spawn(_one_rank_dies, 2)
    assert info.value.exit_code == 3


def test_full_disk_while_predicting_fails_loudly_and_leaves_no_partial_file(tiny_run, synth_data, tmp_path):
    out = tmp_path / "pred"

    def limit_file_size():  # every write past 64 KiB fails as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = subprocess.run([sys.executable, "-m", "vesuvius_lab", "predict", str(tiny_run), "--input",
                             str(synth_data / "test_images"), "--output", str(out), "--probabilities"],
                            capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert "no space left to write" in result.stderr and "Traceback" not in result.stderr
    assert [p for p in out.iterdir() if not p.name.startswith(".")] == []


def test_two_runs_into_one_runs_dir_while_reading(synth_data, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "VLAB_DATA": str(synth_data), "VLAB_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    processes = []
    for name in ("same", "same"):  # two runs of one experiment also race for a folder name
        path = tmp_path / f"{name}-{len(processes)}.toml"
        path.write_text(tiny_experiment(name))
        processes.append(subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "train", str(path)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reads = 0
    while any(p.poll() is None for p in processes):
        for run in find_runs(runs):  # reading while they write never trips
            run.read("summary.json", {}), run.read("status.json", {}), run.metrics(), effective_state(run)
            reads += 1
        time.sleep(0.05)
    for process in processes:
        assert process.wait() == 0, process.stderr.read()
    done = find_runs(runs)
    assert len(done) == 2 and len({run.path for run in done}) == 2 and reads > 0
    for run in done:
        assert effective_state(run) == "finished"
        assert [m["epoch"] for m in run.metrics()] == [1]
        assert "score" in run.read("summary.json") and run.read("spec.json")["name"] == run.experiment
        checkpoint.load(run.checkpoints / "last.pt")
