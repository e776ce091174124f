"""``vlab run --jobs N`` and ``--launcher``: device shares, the queue's order, jobs at once in their own
processes (complete records, a killed job, Ctrl-C, resuming), submitit's local executor, the SLURM
settings and the multi-node command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import start_vlab, tiny_experiment, vlab

from vesuvius_lab.core.config.experiment import SpecError
from vesuvius_lab.core.config.project import load_project
from vesuvius_lab.core.config.spec import LauncherSettings
from vesuvius_lab.core.launch.batch import plan
from vesuvius_lab.core.launch.parallel import WarmWorkers, dependencies
from vesuvius_lab.core.training.cpu_share import FILE_VARIABLE
from vesuvius_lab.core.launch.slots import lend_free_cores, machine_pool, split_evenly
from vesuvius_lab.core.launch.submit import minutes, sbatch_script, slurm_parameters
from vesuvius_lab.core.launch.torchrun import torchrun_command
from vesuvius_lab.core.runs.folder import Run, effective_state, find_runs

# --------------------------------------------------------------------------- devices, order, settings


def test_cores_are_shared_out_and_a_ddp_job_takes_nproc_shares():
    assert split_evenly((0, 1, 2, 3, 4), 2) == [(0, 1, 2), (3, 4)]
    pool = machine_pool(2, "cpu", cpus=(0, 1, 2, 3))
    first = pool.take(1)
    assert first.cpus == (0, 1) and first.environment()["OMP_NUM_THREADS"] == "2"
    assert first.environment()["VLAB_CPUS"] == "0,1" and "CUDA_VISIBLE_DEVICES" not in first.environment()
    assert pool.take(2) is None  # a DDP job of 2 waits for both shares
    pool.give_back(first)
    both = pool.take(2)
    assert both.cpus == (0, 1, 2, 3) and both.describe() == "cpu 0-3"


def test_the_cores_of_free_cpu_slots_are_lent_to_the_running_jobs_and_taken_back():
    pool = machine_pool(3, "cpu", cpus=(0, 1, 2, 3, 4, 5))
    first, second, third = pool.take(1), pool.take(1), pool.take(1)
    assert lend_free_cores(pool, [first, second, third]) == [(0, 1), (2, 3), (4, 5)]  # nothing free
    pool.give_back(third)
    assert lend_free_cores(pool, [first, second]) == [(0, 1, 4), (2, 3, 5)]
    pool.give_back(second)
    assert lend_free_cores(pool, [first]) == [(0, 1, 2, 3, 4, 5)]
    again = pool.take(1)  # a queued job takes a slot: its cores are no longer lent
    assert lend_free_cores(pool, [first, again]) == [(0, 1, 4), (2, 3, 5)]
    gpus = machine_pool(2, "cuda", cpus=(0, 1, 2, 3), gpus=("0", "1"))
    only = gpus.take(1)
    assert lend_free_cores(gpus, [only]) == [(0, 1)]  # a GPU's cores stay with it


FOLLOW = """
import os, sys, threading, time, torch
from vesuvius_lab.core.training import cpu_share
os.sched_setaffinity(0, {0})
torch.set_num_threads(1)
follower = cpu_share.CoreFollower()
waiting = threading.Event()
helper = threading.Thread(target=waiting.wait)  # a thread that exists before the move moves too
helper.start()
cpu_share.write_cores(os.environ[cpu_share.FILE_VARIABLE], (0, 1))
assert not follower.follow()  # at most one look a second
time.sleep(cpu_share.CHECK_EVERY_S)
assert follower.follow() and not follower.follow()
tasks = [int(t) for t in os.listdir("/proc/self/task")]
print(torch.get_num_threads(), sorted({tuple(sorted(os.sched_getaffinity(t))) for t in tasks}))
waiting.set()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs two cores on Linux")
def test_a_job_moves_every_thread_to_the_cores_its_file_names(tmp_path):
    env = {**os.environ, FILE_VARIABLE: str(tmp_path / "job.cpus")}
    result = subprocess.run([sys.executable, "-c", FOLLOW], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "[(0,", "1)]"]


def test_each_cuda_job_gets_its_own_gpus():
    pool = machine_pool(4, "cuda", cpus=tuple(range(8)), gpus=("0", "1", "2", "3"))
    one, two = pool.take(1), pool.take(2)
    assert one.environment()["CUDA_VISIBLE_DEVICES"] == "0" and one.cpus == (0, 1)
    assert two.environment()["CUDA_VISIBLE_DEVICES"] == "1,2" and two.environment()["OMP_NUM_THREADS"] == "4"
    assert pool.take(2) is None and pool.take(1).gpus == ("3",)


def test_ensembles_wait_for_the_jobs_before_them_and_a_repeated_spec_for_its_first(tmp_path):
    (tmp_path / "a.toml").write_text(tiny_experiment("a"))
    (tmp_path / "b.toml").write_text(tiny_experiment("b"))
    (tmp_path / "ens.toml").write_text('name = "ens"\n[ensemble]\nmembers = [{ experiment = "a" }, '
                                       '{ experiment = "b" }]\n')
    (tmp_path / "vesuvius.toml").write_text('device = "cpu"\n')
    project = load_project(tmp_path / "vesuvius.toml")
    jobs, problems = plan([tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "a.toml", tmp_path / "ens.toml"],
                          project)
    assert not problems and [job.spec.name for job in jobs] == ["a", "b", "a", "ens"]
    assert dependencies(jobs) == [set(), set(), {0}, {0, 1, 2}]


def test_launcher_settings_are_checked_and_a_mistake_names_its_key(tmp_path, synth_data, vlab_here):
    (tmp_path / "vesuvius.toml").write_text('[launcher]\npartition = "gpu"\ntime = "soon"\nnodes = 0\n'
                                            'sbatch = ["qos=high"]\n')
    with pytest.raises(SpecError) as caught:
        load_project(tmp_path / "vesuvius.toml")
    message = str(caught.value)
    for key in ("launcher.time", "launcher.nodes", "launcher.sbatch"):
        assert key in message
    assert "is not a SLURM time limit" in message and "vesuvius.toml:3" in message
    (tmp_path / "tiny.toml").write_text(tiny_experiment())
    result = vlab_here(["--project", str(tmp_path / "vesuvius.toml"), "run", str(tmp_path / "tiny.toml"),
                        "--launcher", "slurm"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(tmp_path / "runs"))
    assert result.returncode == 2 and "launcher.time" in result.stderr and "Traceback" not in result.stderr


def test_without_slurm_or_with_local_jobs_and_no_wait_the_command_says_so(tmp_path, synth_data, vlab_here):
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(tiny_experiment())
    result = vlab_here(["run", str(tiny), "--no-wait"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(tmp_path / "runs"))
    assert result.returncode == 2 and "--no-wait needs --launcher slurm" in result.stderr
    if not any((Path(p) / "srun").exists() for p in __import__("os").environ.get("PATH", "").split(":")):
        result = vlab_here(["run", str(tiny), "--launcher", "slurm"], VLAB_DATA=str(synth_data),
                           VLAB_RUNS=str(tmp_path / "runs"))
        assert result.returncode == 2 and "no `srun` on the PATH" in result.stderr
    assert not find_runs(tmp_path / "runs")


def test_time_limits_in_minutes():
    assert [minutes(t) for t in ("90", "90:30", "4:00:00", "1-12", "1-12:30", "1-00:00:01")] == \
        [90, 91, 240, 2160, 2190, 1441]


def test_slurm_settings_become_the_sbatch_script(tmp_path):
    settings = LauncherSettings(partition="gpu", time="2:00:00", gpus_per_node=1, cpus_per_task=8, mem_gb=32,
                                sbatch=["--qos=high", "#SBATCH --account vesuvius", "--exclusive"],
                                setup=["module load cuda/12.4"])
    script = sbatch_script(settings, tmp_path, nproc=2, name="vlab-unet")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=2",  # a DDP job of nproc 2 asks for 2 GPUs
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32768MB", "#SBATCH --qos=high",
                 "#SBATCH --account=vesuvius", "#SBATCH --exclusive", "#SBATCH --job-name=vlab-unet",
                 "module load cuda/12.4"):
        assert line in script.splitlines(), line
    assert "srun" in script


def test_a_multi_node_job_runs_one_torchrun_per_node_from_slurm_environment(tmp_path):
    settings = LauncherSettings(nodes=2, gpus_per_node=4)
    parameters = slurm_parameters(settings, nproc=1)
    assert parameters["nodes"] == 2 and parameters["ntasks_per_node"] == 1 and parameters["gpus_per_node"] == 4
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "77"}
    command = torchrun_command(env, 4, 29500, tmp_path / "job.pkl", tmp_path / "result.json")
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node-rank=1", "--nproc-per-node=4", "--master-addr=gpu03",
            "--master-port=29500"} <= set(command)
    assert command[-4:] == ["-m", "vesuvius_lab.core.launch.worker", str(tmp_path / "job.pkl"),
                            str(tmp_path / "result.json")]


def test_warm_workers_that_get_no_job_exit_and_leave_nothing_behind(tmp_path):
    pool = machine_pool(2, "cpu", cpus=(0, 1))  # a warm worker takes its cores only with a job
    warm = WarmWorkers(pool, tmp_path, count=2)
    processes = [process for process, _ in warm.waiting.values()]
    assert len(processes) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["warm-1.log", "warm-2.log"]
    warm.close()
    assert [process.returncode for process in processes] == [0, 0] and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- jobs at once, for real


def _experiments(tmp_path: Path, **names_epochs_iterations) -> list[str]:
    files = []
    for name, (epochs, iterations) in names_epochs_iterations.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(tiny_experiment(name, epochs=epochs, iterations=iterations))
        files.append(str(path))
    return files


def _run_of(runs: Path, experiment: str, timeout: float = 300, epochs: int = 0, process=None) -> Run:
    """The run of ``experiment`` once it has ``epochs`` epochs recorded."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs_now = [run for run in find_runs(runs) if run.experiment == experiment]
        if runs_now and len(runs_now[0].metrics()) >= epochs:
            return runs_now[0]
        assert process is None or process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{experiment}: no run with {epochs} epochs in time")


def _complete(run: Run, epochs: int) -> None:
    assert effective_state(run) == "finished"
    assert [m["epoch"] for m in run.metrics()] == list(range(1, epochs + 1))
    for name in ("spec.json", "env.json", "summary.json", "scores.json"):
        assert run.read(name), name
    assert run.read("spec.json")["name"] == run.experiment and "score" in run.read("summary.json")
    assert (run.checkpoints / "best.pt").is_file() and (run.checkpoints / "last.pt").is_file()
    log = (run.path / "log.txt").read_text()
    assert f"run {run.path}" in log and log.count("run /") == log.count(f"run {run.path}")  # only its own lines


@pytest.mark.slow
def test_two_jobs_at_once_stop_together_on_ctrl_c_then_resume_with_complete_records(synth_data, tmp_path,
                                                                                     vlab_here):
    runs = tmp_path / "runs"
    files = _experiments(tmp_path, one=(3, 32), two=(3, 32))  # epochs of seconds: both are surely mid-run
    process = start_vlab(["run", *files, "--jobs", "2"], synth_data, runs)
    try:
        first = _run_of(runs, "one", epochs=1, process=process)
        second = _run_of(runs, "two", epochs=1, process=process)
        assert len(first.metrics()) < 3 and len(second.metrics()) < 3  # both are training now
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "every running job saves its run and stops" in stderr
    for run in (first, second):
        assert effective_state(run) == "interrupted" and (run.checkpoints / "last.pt").is_file()
    for run in (first, second):  # each trained in a process of its own
        assert "vesuvius_lab/core/launch/worker.py" in " ".join(run.read("env.json")["command"])

    again = vlab(["run", *files, "--jobs", "2"], synth_data, runs)
    assert again.returncode == 0, again.stderr
    assert "2 resumed" in again.stderr and sorted(find_runs(runs)) == sorted([first, second])
    for run in (first, second):
        _complete(run, 3)
    board = vlab_here(["leaderboard"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    assert "one" in board.stdout and "two" in board.stdout and "killed" not in board.stdout + board.stderr


@pytest.mark.slow
def test_a_killed_job_shows_as_killed_the_other_finishes_and_the_next_run_resumes_it(synth_data, tmp_path,
                                                                                      vlab_here):
    runs = tmp_path / "runs"
    files = _experiments(tmp_path, doomed=(3, 64), fine=(1, 2))  # its resumed epochs outlast a check of its cores
    process = start_vlab(["run", *files, "--jobs", "2"], synth_data, runs)
    try:
        doomed = _run_of(runs, "doomed", epochs=1, process=process)
        os.kill(doomed.read("status.json")["pid"], signal.SIGKILL)  # the job's process writes its status
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 2, stderr
    stderr = " ".join(stderr.split())
    assert "killed doomed fold 0: its process was killed by SIGKILL" in stderr and "1 trained" in stderr
    assert effective_state(doomed) == "killed"
    _complete(_run_of(runs, "fine"), 1)
    board = vlab_here(["leaderboard"], VLAB_DATA=str(synth_data), VLAB_RUNS=str(runs))
    listed = board.stdout + board.stderr
    assert "killed" in listed and "doomed/" in listed

    again = vlab(["run", *files, "--jobs", "2"], synth_data, runs)
    assert again.returncode == 0, again.stderr
    assert "1 resumed" in again.stderr and "1 skipped" in again.stderr
    assert len(find_runs(runs)) == 2
    _complete(doomed, 3)
    if len(os.sched_getaffinity(0)) >= 2:  # resumed alone: it started on its share and took up the free one
        assert "vlab run --jobs shared out the cores" in (doomed.path / "log.txt").read_text()


@pytest.mark.slow
def test_submitit_local_executor_runs_two_jobs_and_a_killed_one_shows_as_killed(synth_data, tmp_path):
    runs = tmp_path / "runs"
    files = _experiments(tmp_path, victim=(3, 8), survivor=(1, 2))
    process = start_vlab(["run", *files, "--launcher", "submitit-local", "--jobs", "2"], synth_data, runs)
    try:
        victim = _run_of(runs, "victim", epochs=1, process=process)
        os.kill(victim.read("status.json")["pid"], signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 2, stderr
    assert "killed victim fold 0" in " ".join(stderr.split())
    assert effective_state(victim) == "killed"
    _complete(_run_of(runs, "survivor"), 1)
    jobs = [p for p in (runs / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2 and all(list(job.glob("*_submitted.pkl")) for job in jobs)
    assert len([job for job in jobs if list(job.glob("*_result.pkl"))]) == 1  # the killed one left no result


@pytest.mark.slow
def test_no_wait_prints_the_job_ids_and_the_jobs_run_on(synth_data, tmp_path):
    runs = tmp_path / "runs"
    files = _experiments(tmp_path, first=(1, 2), second=(1, 2))
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    env = {**os.environ, "VLAB_DATA": str(synth_data), "VLAB_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    with open(out, "w") as stdout, open(err, "w") as stderr:  # the jobs outlive the command: no pipes to wait on
        result = subprocess.run([sys.executable, "-m", "vesuvius_lab", "run", *files, "--launcher", "submitit-local",
                                 "--no-wait"], env=env, stdout=stdout, stderr=stderr, timeout=300)
    assert result.returncode == 0, err.read_text()
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    assert [label for _, label in lines] == ["first fold 0", "second fold 0"]
    assert all(job_id.isdigit() for job_id, _ in lines) and "2 job(s) submitted" in err.read_text()
    for name in ("first", "second"):
        run = _run_of(runs, name, epochs=1)
        deadline = time.time() + 120
        while effective_state(run) != "finished" and time.time() < deadline:
            time.sleep(0.2)
        _complete(run, 1)
    for job_id, _ in lines:
        assert (runs / ".submitit" / job_id / f"{job_id}_submitted.pkl").is_file()


@pytest.mark.slow
def test_the_torchrun_of_a_multi_node_job_trains_the_run_here_with_one_node(synth_data, tmp_path, monkeypatch):
    """What each node of a multi-node job runs, on one node of 2 ranks (gloo on the CPU): the same run
    is written once, by rank 0, with the world size of torchrun."""
    from vesuvius_lab.core.launch.worker import Payload, run_submitted

    runs = tmp_path / "runs"
    (tmp_path / "vesuvius.toml").write_text(f'data_root = "{synth_data}"\nruns_dir = "runs"\ndevice = "cpu"\n')
    (tmp_path / "tiny.toml").write_text(tiny_experiment(epochs=1, iterations=2))
    project = load_project(tmp_path / "vesuvius.toml")
    (job,), _ = plan([tmp_path / "tiny.toml"], project)
    for key, value in {"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost",
                       "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    from vesuvius_lab.core.training.distributed import free_port

    payload = Payload(job, project, None, {}, torchrun={"folder": str(tmp_path / "torchrun"), "port": free_port(),
                                                        "nproc_per_node": 2})
    outcome = run_submitted(payload)
    assert outcome["status"] == "trained", outcome
    (run,) = find_runs(runs)
    assert outcome["run"] == str(run.path) and run.read("env.json")["world_size"] == 2
    _complete(run, 1)
