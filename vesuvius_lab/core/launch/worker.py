"""One job of a batch, run in a process of its own.

``python -m vesuvius_lab.core.launch.worker PAYLOAD RESULT`` (the local launcher), or
:func:`run_submitted` called by submitit (the SLURM launcher and submitit's local executor). Either
way the job trains (or resumes, or builds its ensemble) exactly as ``vlab run`` does in-process,
holding its run's lock, and the outcome is written to ``RESULT`` (JSON) or returned:
``{"status": "trained" | "resumed" | "failed" | "interrupted", "run": path or null, "error": text}``.
Exit status: 0, 2 for a user's mistake, 1 for another error, 128 + signal when stopped by a signal.

This module imports no torch at import time: the job's thread limits are set before torch is
loaded (its CPU affinity just after: see :func:`~vesuvius_lab.core.launch.slots.pin_from_environment`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vesuvius_lab.core import children, interrupts
from vesuvius_lab.core.config.project import Project
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import write_json_atomic
from vesuvius_lab.core.launch.batch import Job
from vesuvius_lab.core.launch.slots import pin_from_environment


@dataclass(frozen=True)
class Ended:
    """How a job's process ended: "trained", "resumed", "failed", "interrupted" or "killed"."""

    status: str
    run: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Payload:
    """Everything a job's process needs: the job, the project, the run to resume and its environment."""

    job: Job
    project: Project
    resume: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)  # VLAB_DATA/VLAB_RUNS, threads, cores, GPUs
    torchrun: dict | None = None  # multi-node: see vesuvius_lab.core.launch.torchrun


def write_payload(payload: Payload, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pickle.dumps(payload))
    tmp.replace(path)
    return path


def read_payload(path: Path) -> Payload:
    return pickle.loads(Path(path).read_bytes())


def execute(payload: Payload) -> dict:
    """Run the job in this process (its environment applied first); the outcome as a dict. Stop signals
    (Ctrl-C, SIGTERM) save the run and raise :class:`interrupts.Interrupted`."""
    from vesuvius_lab.core.launch.batch import _execute

    os.environ.update(payload.environment)
    pin_from_environment()
    run = _execute(payload.job, payload.project, _reopened(payload.resume))
    return {"status": "resumed" if payload.resume else "trained", "run": str(run.path), "error": None}


def _reopened(resume: Path | None):
    from vesuvius_lab.core.runs.folder import Run

    return Run(Path(resume)) if resume else None


def outcome_of(payload: Payload) -> tuple[dict, int]:
    """:func:`execute`, every way it can end turned into (outcome, exit status)."""
    try:
        with interrupts.stop_signals():
            return execute(payload), 0
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        return {"status": "interrupted", "run": str(payload.resume) if payload.resume else None,
                "error": f"stopped by {exc or 'SIGINT'}"}, getattr(exc, "exit_code", 128 + signum)
    except UserError as exc:
        return {"status": "failed", "run": None, "error": str(exc)}, exc.exit_code
    except Exception as exc:  # reported as the job's failure; the traceback goes to the job's log
        traceback.print_exc()
        return {"status": "failed", "run": None, "error": f"{type(exc).__name__}: {exc}"}, 1


def _quiet() -> None:
    """timm (under segmentation-models-pytorch) still uses torch.jit.interface: not shown, as by the command line."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.*", category=FutureWarning)


def run_submitted(payload: Payload) -> dict:
    """What submitit runs on the cluster (or its local executor): the job, or on several nodes this
    node's torchrun of it; never raises for the job's own failure, so submitit returns the outcome.
    submitit's "time is nearly up / preempted" signal (SIGUSR2) stops the job as SIGTERM does: it saves
    its run, which ends interrupted and is resumed by the next ``vlab run``."""
    _quiet()
    with _signals({signal.SIGUSR2: lambda *_: os.kill(os.getpid(), signal.SIGTERM)}):
        return _run_torchrun(payload) if payload.torchrun else outcome_of(payload)[0]


@contextmanager
def _signals(handlers: dict):
    """Install signal handlers for the block (main thread only), then put the previous ones back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_torchrun(payload: Payload) -> dict:
    """This node's share of a multi-node job: torchrun, its rendezvous taken from SLURM's environment."""
    from vesuvius_lab.core.launch.torchrun import torchrun_command

    node = os.environ.get("SLURM_NODEID", "0")
    folder = Path(payload.torchrun["folder"])
    job_file = write_payload(dataclasses.replace(payload, torchrun=None), folder / f"payload-node{node}.pkl")
    result_file = folder / "result.json"
    if node == "0":
        result_file.unlink(missing_ok=True)  # rank 0, on this node, writes it anew
    command = torchrun_command(os.environ, payload.torchrun["nproc_per_node"], payload.torchrun["port"],
                               job_file, result_file)
    print(" ".join(command), flush=True)
    # torchrun ends (SIGTERM: its ranks save and stop) when this process dies, and passes a stop on to its ranks
    process = subprocess.Popen(command, env={**os.environ, **payload.environment},
                               preexec_fn=children.preexec(signal.SIGTERM))
    code = None
    with interrupts.passed_on() as new_signals:
        while code is None:
            if new_signals():
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=interrupts.POLL_S)
            except subprocess.TimeoutExpired:
                pass
    if node != "0":
        return {"status": "trained" if code == 0 else "failed", "run": None, "error": None}
    result = read_result(result_file)
    if result is None:
        result = {"status": "failed", "run": None, "error": f"torchrun exited with status {code} and no result"}
    return result


def read_result(path: Path) -> dict | None:
    """A job's outcome as its process wrote it; None when it wrote none (killed) or it is unreadable."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("status"), str) else None


#: ``worker --warm``: load what every job needs, then wait for a job's files on stdin.
WARM_FLAG = "--warm"
#: What every training job imports (MONAI, for the augmentation, alone takes seconds).
WARM_MODULES = ("torch", "vesuvius_lab.core.data.augment", "vesuvius_lab.core.training.trainer")


def warm_up() -> list[str] | None:
    """A warm worker: import torch, MONAI and the trainer now (seconds that ``vlab run`` spends
    planning meanwhile), then wait for one line ``PAYLOAD<TAB>RESULT`` on stdin; None when stdin
    closes first (no job came for this worker)."""
    for module in WARM_MODULES:
        importlib.import_module(module)

    line = sys.stdin.readline().rstrip("\n")
    return line.split("\t") if line else None


def main(argv: list[str]) -> int:
    """``worker PAYLOAD RESULT`` (or ``worker --warm``, which reads them from stdin): run the job, write
    its outcome to RESULT, exit with its status. When the process that started it dies (``vlab run``
    killed, its terminal closed) the job gets SIGTERM: it saves its run and ends interrupted, resumed by
    the next ``vlab run`` (killed if it has not ended within :data:`children.GRACE_S`)."""
    children.adopt_from_environment(signum=signal.SIGTERM)
    _quiet()
    if argv[:1] == [WARM_FLAG]:
        argv = warm_up()
        if argv is None:
            return 0
    payload_file, result_file = Path(argv[0]), Path(argv[1])
    outcome, code = outcome_of(read_payload(payload_file))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        write_json_atomic(result_file, outcome)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
