"""Faults a long job meets: a kill mid-write, a dying DDP rank, a full disk, two runs at once, SIGTERM,
two processes that want one run, damaged records, writes that fail."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import KILLED, copy_run, experiment, start_vlab, tiny_experiment, vlab, wait_for_epochs

from vesuvius_lab.core.runs import checkpoint
from vesuvius_lab.core.runs.folder import Run, effective_state, find_runs
from vesuvius_lab.core.runs.lock import RunLock
from vesuvius_lab.core.training import distributed

WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from vesuvius_lab.core.runs import checkpoint
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
    assert "file-size limit" in result.stderr and "Traceback" not in result.stderr
    assert [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")] == []


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


# --------------------------------------------------------------------------- SIGTERM


def _sleep_a_few_steps_into_the_next_epoch(run: Run, iterations: int, steps: int = 4) -> None:
    """Called as soon as an epoch is recorded: sleep for about ``steps`` training steps, timed by that epoch,
    so that a signal sent next lands inside the next epoch and well before its end, whether a step takes
    milliseconds (an idle machine) or a second (a crowded one)."""
    time.sleep(steps * run.metrics()[-1]["time_s"] / iterations)


def test_sigterm_saves_mid_epoch_and_the_resume_keeps_the_exact_schedule(synth_data, tmp_path, vlab_here):
    """SLURM, Kubernetes, docker stop and Kaggle send SIGTERM: the run saves at a step boundary inside the
    epoch, is marked interrupted and resumable, and the resumed run ends with the schedule, step count and
    records of a run that was never stopped."""
    runs, straight, iterations = tmp_path / "runs", tmp_path / "straight", 40
    file = experiment(tmp_path, epochs=2, iterations=iterations)
    process = start_vlab(["train", str(file)], synth_data, runs)
    run = wait_for_epochs(runs, 1, process)
    _sleep_a_few_steps_into_the_next_epoch(run, iterations)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "vlab train --resume" in stderr and "Traceback" not in stderr
    assert effective_state(run) == "interrupted" and run.read("status.json")["signal"] == "SIGTERM"
    state = checkpoint.load(run.checkpoints / "last.pt")
    epoch, iteration = state["resume_at"]
    assert epoch == 1 and 0 < iteration < iterations, state["resume_at"]  # inside epoch 2, not at its start
    assert state["scheduler"]["last_epoch"] == iterations + iteration      # one scheduler step per optimizer step

    resumed = vlab(["train", "--resume", str(run.path)], synth_data, runs)
    assert resumed.returncode == 0, resumed.stderr
    assert f"in epoch 2 at iteration {iteration + 1}" in resumed.stderr
    never_stopped = vlab_here(["train", str(file)], VLAB_DATA=str(synth_data), VLAB_RUNS=str(straight))
    assert never_stopped.returncode == 0, never_stopped.stderr
    (reference,) = find_runs(straight)
    final, expected = checkpoint.load(run.checkpoints / "last.pt"), checkpoint.load(reference.checkpoints / "last.pt")
    assert final["scheduler"]["last_epoch"] == expected["scheduler"]["last_epoch"] == 2 * iterations
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert run.metrics()[1]["lr"] == pytest.approx(reference.metrics()[1]["lr"])


def test_sigterm_to_a_ddp_run_stops_every_rank_at_one_step_and_resumes(synth_data, tmp_path):
    """Two DDP ranks on the CPU (gloo) train and checkpoint one run; their parent passes SIGTERM on, and the
    ranks agree on the step to stop at."""
    runs, iterations = tmp_path / "runs", 40
    process = start_vlab(["train", str(experiment(tmp_path, epochs=2, iterations=iterations)), "--nproc", "2"],
                         synth_data, runs)
    run = wait_for_epochs(runs, 1, process)
    assert run.read("env.json")["world_size"] == 2 and (run.checkpoints / "last.pt").is_file()
    _sleep_a_few_steps_into_the_next_epoch(run, iterations)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "starting 2 DDP processes (gloo)" in stderr
    assert effective_state(run) == "interrupted" and "Traceback" not in stderr
    epoch, iteration = checkpoint.load(run.checkpoints / "last.pt")["resume_at"]
    assert epoch == 1 and 0 < iteration < iterations
    resumed = vlab(["train", "--resume", str(run.path)], synth_data, runs)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert checkpoint.load(run.checkpoints / "last.pt")["scheduler"]["last_epoch"] == 2 * iterations


# --------------------------------------------------------------------------- one run, one writer


def test_a_run_held_by_another_process_is_never_written_twice(killed_run, synth_data, tmp_path, vlab_here):
    """Two `vlab run` started at once would both resume the same killed run: the lock lets one write it;
    the other says who holds it, and the run's records stay single."""
    runs = tmp_path / "runs"
    file = experiment(tmp_path, **KILLED)  # the experiment the killed run was started from
    run = copy_run(killed_run, runs)
    assert effective_state(run) == "killed"
    metrics, log = (run.path / "metrics.jsonl").read_bytes(), (run.path / "log.txt").read_bytes()

    with RunLock(run):  # this test process plays the one that resumed it first
        for command in (["run", str(file)], ["train", "--resume", str(run.path)]):
            second = vlab(command, synth_data, runs)
            assert second.returncode == 2, second.stderr
            assert f"being written by process {os.getpid()}" in " ".join(second.stderr.split())
            assert "Traceback" not in second.stderr
        assert (run.path / "metrics.jsonl").read_bytes() == metrics
        assert (run.path / "log.txt").read_bytes() == log
        assert find_runs(runs) == [run]

    finished = vlab_here(["run", str(file)], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))  # released: it resumes
    assert finished.returncode == 0, finished.stderr
    assert [m["epoch"] for m in run.metrics()] == [1, 2, 3]


# --------------------------------------------------------------------------- damaged records


@pytest.fixture
def run_to_damage(killed_run, tmp_path) -> Run:
    """A copy of a run killed after epoch 1, to damage."""
    return copy_run(killed_run, tmp_path / "runs")


@pytest.mark.parametrize("damage", ["zero-byte checkpoint", "spec that no longer validates",
                                    "status that is a list", "summary that is a string"])
def test_damaged_records_are_messages_and_never_take_the_leaderboard_down(damage, run_to_damage, synth_data,
                                                                          vlab_here):
    run, runs = run_to_damage, run_to_damage.path.parent.parent
    if damage == "zero-byte checkpoint":
        (run.checkpoints / "last.pt").write_bytes(b"")
        expected = "not a readable vesuvius-lab checkpoint"
    elif damage == "spec that no longer validates":
        spec = run.read("spec.json")
        spec["train"]["epochs"] = "many"
        (run.path / "spec.json").write_text(json.dumps(spec))
        expected = "not a valid experiment record"
    elif damage == "status that is a list":
        (run.path / "status.json").write_text("[1, 2, 3]")
        expected = None
    else:
        (run.path / "summary.json").write_text('"finished"')
        expected = None
    if expected:
        resumed = vlab_here(["train", "--resume", str(run.path)], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
        assert resumed.returncode == 2 and expected in resumed.stderr, resumed.stderr
        assert "Traceback" not in resumed.stderr
    board = vlab_here(["leaderboard", "--runs"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert board.returncode == 0, board.stderr
    assert "Traceback" not in board.stderr


# --------------------------------------------------------------------------- writes that fail


@pytest.mark.parametrize("command", [
    ["schema", "-o", "{file}/schema.json"],
    ["leaderboard", "--html", "{file}/board.html"],
    ["submit", "{run}", "--input", "{data}/test_images", "--output", "{file}/submission.zip"],
    ["--runs", "{file}/runs", "train", "{experiment}"],
])
def test_an_output_whose_parent_is_a_file_is_a_message(command, tiny_run, synth_data, tmp_path, vlab_here):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [part.format(file=blocker, run=tiny_run, data=synth_data, experiment=experiment(tmp_path))
            for part in command]
    result = vlab_here(args, VLAB_DATA=str(synth_data), VLAB_RUNS=str(tiny_run.parent.parent))
    assert result.returncode == 2, result.stderr
    assert str(blocker) in result.stderr and "is a file" in result.stderr and "Traceback" not in result.stderr


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("limit, writer", [(16 * 1024, "numpy, the decoded-volume cache"),
                                           (4 * 1024 * 1024, "torch, a checkpoint")])
def test_a_file_size_limit_hit_by_numpy_or_torch_is_a_message(limit, writer, synth_data, tmp_path):
    """Neither library reports a failed write with an errno: one place (atomic writes) turns both into
    a message naming the file, and nothing half-written is left."""
    runs = tmp_path / "runs"
    env = {**os.environ, "VLAB_DATA": str(synth_data), "VLAB_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "vesuvius_lab", "train", str(experiment(tmp_path))],
                            capture_output=True, text=True, env=env, timeout=600, preexec_fn=_file_size_limit(limit))
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and ("file-size limit" in message or "cut short" in message), message
    suffix = ".npy" if "numpy" in writer else ".pt"
    assert suffix in message
    assert not [p for p in runs.rglob(f"*{suffix}*") if p.name.startswith(".")]  # no temporary left behind


FORKED_POOL = textwrap.dedent("""
    import multiprocessing
    from vesuvius_lab.core import interrupts
    with interrupts.stop_signals():
        for _ in range(5):
            with multiprocessing.get_context("fork").Pool(2) as pool:  # leaving it terminates the workers
                assert pool.map(abs, range(-20, 20)) == [abs(i) for i in range(-20, 20)]
    print("done", flush=True)
""")


def test_processes_forked_while_the_handlers_are_installed_die_on_sigterm_as_before():
    """A pool (nnU-Net's preprocessing, say) terminates its workers with SIGTERM: they must die, not raise
    Interrupted while holding the pool's queue lock, which hangs the pool."""
    result = subprocess.run([sys.executable, "-c", FORKED_POOL], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr
    assert "Traceback" not in result.stderr
