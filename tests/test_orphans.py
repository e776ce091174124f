"""No orphans: every child process of the tool ends when its parent dies by SIGKILL, and so do the
children of those children and the multiprocessing resource tracker.

Each test starts a real parent (the ``vlab`` command, or a small script using the project's own pools),
waits until its children exist, SIGKILLs the parent, and checks that none of its descendants is alive
20 s later (it looks every 0.1 s, so a test takes seconds when nothing is left behind).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import tiny_experiment

from vesuvius_lab.core.runs.folder import effective_state, find_runs

#: How long the children of a killed parent may take to end.
END_S = 20.0


# --------------------------------------------------------------------------- processes, from /proc


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (children whose parent is it, recursively): pid -> start time."""
    found, todo = {}, [pid]
    while todo:
        for child in _children(todo.pop()):
            fields = _stat(child)
            if fields:
                found[child] = fields[19]  # the start time tells a reused pid from the process we saw
                todo.append(child)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == started


def _wait_for_descendants(parent: subprocess.Popen, enough, timeout: float = 300) -> dict[int, str]:
    """The parent's descendants once ``enough(commands)`` says they are all there."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = _descendants(parent.pid)
        if enough([_command(pid) for pid in found]):
            return _descendants(parent.pid)
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.2)
    raise AssertionError(f"the children did not appear in time: {[_command(p) for p in _descendants(parent.pid)]}")


def _kill_and_check_nothing_is_left(parent: subprocess.Popen, descendants: dict[int, str]) -> None:
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.time() + END_S
    while time.time() < deadline and any(_alive(pid, started) for pid, started in descendants.items()):
        time.sleep(0.1)
    left = [f"{pid}: {_command(pid)}" for pid, started in descendants.items() if _alive(pid, started)]
    for pid in [pid for pid, started in descendants.items() if _alive(pid, started)]:
        os.kill(pid, signal.SIGKILL)  # this test's own leftovers, not to disturb the next tests
    assert not left, f"alive {END_S:.0f} s after their parent was killed:\n" + "\n".join(left)


def _count(commands: list[str], text: str) -> int:
    return sum(text in command for command in commands)


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "parent.py"
    path.write_text(textwrap.dedent(body))
    return path


def _start(script: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return _started(subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs))


_parents: list[subprocess.Popen] = []


def _started(parent: subprocess.Popen) -> subprocess.Popen:
    _parents.append(parent)
    return parent


@pytest.fixture(autouse=True)
def _no_parent_left():
    """A test that fails before it kills its parent kills it then (its children follow it)."""
    yield
    while _parents:
        parent = _parents.pop()
        if parent.poll() is None:
            parent.kill()
            parent.communicate()


SPAWNED = "multiprocessing.spawn"
TRACKER = "multiprocessing.resource_tracker"


# --------------------------------------------------------------------------- scoring workers


def test_vlab_evaluate_workers_and_the_resource_tracker_end_with_a_killed_vlab_evaluate(synth_data, tmp_path):
    """``vlab evaluate --workers 2``: spawned scoring workers, and the resource tracker they use."""
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    labels.mkdir()
    source = sorted((synth_data / "train_labels").glob("*.tif"))[0]
    for i in range(60):  # enough volumes that the workers are still scoring when the command is killed
        shutil.copy(source, labels / f"v{i:02d}.tif")
    shutil.copytree(labels, preds)
    parent = _started(subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "evaluate", str(preds), str(labels),
                                        "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    found = _wait_for_descendants(parent, lambda commands: _count(commands, SPAWNED) >= 2)
    assert any(TRACKER in _command(pid) for pid in found)
    _kill_and_check_nothing_is_left(parent, found)


CASE_SCORER = """
    import sys
    from pathlib import Path

    import numpy as np

    from vesuvius_lab.core.tuning.cases import Case
    from vesuvius_lab.core.tuning.scoring import CaseScorer

    if __name__ == "__main__":
        label = sys.argv[1]
        probabilities = Path("p.npy")
        np.save(probabilities, np.random.default_rng(0).random((32, 48, 48)).astype(np.float16))
        cases = [Case(f"c{i}", i % 2, str(probabilities), label) for i in range(4)]
        scorer = CaseScorer(cases, ignore_label=2, workers=2, runs_dir=Path("runs"))
        scorer.score(([], 0.5), [case.id for case in cases])  # every worker has started and scored
        print("ready", flush=True)
        sys.stdin.read()  # until killed
"""


def test_tuning_workers_end_with_their_killed_parent(synth_data, tmp_path):
    """``vlab tune``'s CaseScorer: one spawned process per worker, each in a pool of its own."""
    label = sorted((synth_data / "train_labels").glob("*.tif"))[0]
    parent = _start(_script(tmp_path, CASE_SCORER), str(label), stdin=subprocess.PIPE)
    assert parent.stdout.readline().strip() == "ready", parent.communicate()
    found = _descendants(parent.pid)
    assert _count([_command(pid) for pid in found], SPAWNED) == 2
    _kill_and_check_nothing_is_left(parent, found)


# --------------------------------------------------------------------------- data-loader workers


LOADER = """
    import sys
    import time
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from vesuvius_lab.core import children
    from vesuvius_lab.core.data.loader import Batches

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                yield torch.zeros(4), torch.zeros(4, dtype=torch.uint8)

    def mark(worker_id: int) -> None:  # a loader's own worker_init_fn, which must still run
        Path(f"worker-{worker_id}.started").touch()

    if __name__ == "__main__":
        batches = Batches(Endless(), 2, workers=2)  # the trainer's loader
        next(batches)
        own = iter(DataLoader(Endless(), batch_size=2, num_workers=2,
                              worker_init_fn=children.loader_worker_init(mark)))
        next(own)
        deadline = time.monotonic() + 60  # the first batch may come before the second worker's init has run
        while len(list(Path(".").glob("worker-*.started"))) < 2 and time.monotonic() < deadline:
            next(own)
            time.sleep(0.05)
        print("ready", flush=True)
        sys.stdin.read()  # until killed
"""


def test_data_loader_workers_end_with_their_killed_parent_and_a_loaders_own_init_still_runs(tmp_path):
    parent = _start(_script(tmp_path, LOADER), stdin=subprocess.PIPE)
    assert parent.stdout.readline().strip() == "ready", parent.communicate()
    found = _descendants(parent.pid)
    assert len(found) == 4, [_command(pid) for pid in found]
    assert sorted(p.name for p in tmp_path.glob("*.started")) == ["worker-0.started", "worker-1.started"]
    _kill_and_check_nothing_is_left(parent, found)


# --------------------------------------------------------------------------- DDP ranks, and theirs


DDP = """
    import sys
    import time
    from pathlib import Path

    import torch
    from torch.utils.data import IterableDataset

    from vesuvius_lab.core.data.loader import Batches
    from vesuvius_lab.core.training import distributed

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                yield torch.zeros(4), torch.zeros(4, dtype=torch.uint8)

    def rank_main(rank: int, world_size: int, port: int) -> None:
        distributed.init(rank, world_size, "cpu", port)
        batches = Batches(Endless(), 2, workers=1)  # a grandchild of the command
        next(batches)
        distributed.barrier()
        Path(f"rank-{rank}.ready").touch()
        time.sleep(600)

    if __name__ == "__main__":
        distributed.spawn(rank_main, 2)
"""


def test_ddp_ranks_their_loader_workers_and_the_tracker_end_with_their_killed_parent(tmp_path):
    """Two gloo ranks by the project's own spawn, each with a data-loader worker: a chain of three."""
    parent = _start(_script(tmp_path, DDP))
    deadline = time.time() + 300
    while len(list(tmp_path.glob("rank-*.ready"))) < 2:
        assert time.time() < deadline and parent.poll() is None, parent.communicate()
        time.sleep(0.2)
    found = _descendants(parent.pid)
    commands = [_command(pid) for pid in found]
    # the ranks and the tracker below the command, a loader worker below each rank
    assert len(_children(parent.pid)) == 3 and _count(commands, TRACKER) == 1 and len(found) == 5, commands
    _kill_and_check_nothing_is_left(parent, found)


# --------------------------------------------------------------------------- vlab run --jobs


@pytest.mark.slow
def test_the_jobs_of_a_killed_vlab_run_save_their_runs_and_end(synth_data, tmp_path):
    """The job processes of ``vlab run --jobs 2`` get SIGTERM when it dies: each saves its run at a step
    boundary and ends; the next ``vlab run`` resumes them."""
    files = []
    for name in ("one", "two"):
        path = tmp_path / f"{name}.toml"
        path.write_text(tiny_experiment(name, epochs=50, iterations=20))
        files.append(str(path))
    runs = tmp_path / "runs"
    env = {**os.environ, "VLAB_DATA": str(synth_data), "VLAB_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    parent = _started(subprocess.Popen([sys.executable, "-m", "vesuvius_lab", "run", *files, "--jobs", "2"], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 300
    while len([run for run in find_runs(runs) if run.metrics()]) < 2:  # both jobs are in their training loop
        assert time.time() < deadline and parent.poll() is None, parent.communicate()
        time.sleep(0.2)
    found = _descendants(parent.pid)
    assert _count([_command(pid) for pid in found], "vesuvius_lab.core.launch.worker") == 2
    _kill_and_check_nothing_is_left(parent, found)
    assert sorted(effective_state(run) for run in find_runs(runs)) == ["interrupted", "interrupted"]


# --------------------------------------------------------------------------- pools libraries start


LIBRARY_POOL = """
    import multiprocessing
    import os
    import sys
    import time
    from pathlib import Path

    import vesuvius_lab.core  # what the `vlab` command imports: every child it starts adopts it

    def work(_item) -> None:  # busy, so that it does not end by itself when its queue closes
        Path(f"{os.getpid()}.busy").touch()
        time.sleep(600)

    if __name__ == "__main__":
        with multiprocessing.get_context(sys.argv[1]).Pool(2) as pool:  # as nnU-Net's preprocessing does
            pool.map_async(work, range(2), chunksize=1)
            sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_a_pool_that_a_library_starts_ends_with_its_killed_parent(tmp_path, start_method):
    """A pool started without any hook of ours (nnU-Net's): its busy workers end with the command too."""
    parent = _start(_script(tmp_path, LIBRARY_POOL), start_method, stdin=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("*.busy"))) < 2:
        assert time.time() < deadline and parent.poll() is None, parent.communicate()
        time.sleep(0.1)
    found = _descendants(parent.pid)
    assert len(found) >= 2
    _kill_and_check_nothing_is_left(parent, found)


# --------------------------------------------------------------------------- children of a thread


THREAD = """
    import multiprocessing
    import sys
    import threading
    import time
    from concurrent.futures import ProcessPoolExecutor

    from vesuvius_lab.core import children

    pools = []

    def start() -> None:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(sys.argv[1]), **children.pool_options())
        assert pool.submit(abs, -1).result() == 1  # the worker has adopted this process
        pools.append(pool)

    if __name__ == "__main__":
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()  # the thread that created the worker is gone; the process is not
        print("thread ended", flush=True)
        sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_a_child_created_by_a_thread_outlives_the_thread_and_ends_with_the_process(tmp_path, start_method):
    """Linux signals a child when the *thread* that created it ends; a pool created by a thread that then
    ends must keep its worker, and lose it when the process dies."""
    parent = _start(_script(tmp_path, THREAD), start_method, stdin=subprocess.PIPE)
    assert parent.stdout.readline().strip() == "thread ended", parent.communicate()
    time.sleep(1)  # time for a wrongly sent parent-death signal to land
    found = {pid: started for pid, started in _descendants(parent.pid).items() if TRACKER not in _command(pid)}
    assert len(found) == 1 and all(_alive(pid, started) for pid, started in found.items())
    _kill_and_check_nothing_is_left(parent, _descendants(parent.pid))


# --------------------------------------------------------------------------- programs started with Popen


POPEN = """
    import os
    import subprocess
    import sys

    from vesuvius_lab.core import children

    if __name__ == "__main__":
        python = subprocess.Popen([sys.executable, "-c", "import sys, time; from vesuvius_lab.core import children; "
                                   "children.adopt_from_environment(); print('adopted', flush=True); time.sleep(600)"],
                                  env={**os.environ, **children.environment()}, stdout=subprocess.PIPE, text=True)
        assert python.stdout.readline().strip() == "adopted"
        other = subprocess.Popen(["sleep", "600"], preexec_fn=children.preexec())  # a program that is not ours
        print("ready", flush=True)
        sys.stdin.read()  # until killed
"""


def test_programs_started_with_popen_end_with_their_killed_parent(tmp_path):
    parent = _start(_script(tmp_path, POPEN), stdin=subprocess.PIPE)
    assert parent.stdout.readline().strip() == "ready", parent.communicate()
    found = _descendants(parent.pid)
    assert len(found) == 2
    _kill_and_check_nothing_is_left(parent, found)


# --------------------------------------------------------------------------- block workers of a large volume


def test_the_block_workers_of_a_killed_vlab_predict_jobs_end(tiny_run, tmp_path):
    """``vlab predict ... --output OUT.zarr --jobs 2``: spawned block workers and their resource tracker."""
    from vesuvius_lab.core.data.synthetic_zarr import write_scroll_zarr

    scroll = write_scroll_zarr(tmp_path / "scroll.zarr", (48, 96, 96), seed=1, chunks=(16,) * 3, progress=False)
    out = tmp_path / "out.zarr"
    parent = _started(subprocess.Popen(
        [sys.executable, "-m", "vesuvius_lab", "--device", "cpu", "predict", str(tiny_run), "--input", str(scroll),
         "--output", str(out), "--chunk", "16", "--block", "16", "--support-mask", "none", "--jobs", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    found = _wait_for_descendants(parent, lambda commands: _count(commands, SPAWNED) >= 2)
    deadline = time.time() + 120
    while not list((out / ".vlab" / "done").glob("*.json")) and time.time() < deadline:  # the workers are at work
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.1)
    _kill_and_check_nothing_is_left(parent, found)
