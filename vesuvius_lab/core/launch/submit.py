"""Jobs through submitit: ``--launcher slurm`` (one SLURM job per run) and ``--launcher submitit-local``
(submitit's local executor: the same code path on this machine, without a cluster).

The SLURM settings come from ``[launcher]`` in ``vesuvius.toml`` (see
:class:`~vesuvius_lab.core.config.spec.LauncherSettings`). A job on one node runs the run as
``vlab run`` would (a DDP job spawns its ``nproc`` ranks there and asks for as many GPUs); a job on
several nodes starts one task per node, and each task starts ``torchrun`` with a static rendezvous
on the first node of the allocation (:func:`~vesuvius_lab.core.launch.torchrun.torchrun_command`), ``gpus_per_node`` ranks per node.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from vesuvius_lab.core.config.spec import SBATCH_OPTION, LauncherSettings
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.launch.slots import Lease
from vesuvius_lab.core.launch.worker import Ended

#: The launchers that go through submitit.
SUBMITIT_LAUNCHERS = ("slurm", "submitit-local")


def minutes(limit: str) -> int:
    """A SLURM time limit in whole minutes: "90", "90:30", "4:00:00", "1-12", "1-12:30", "1-12:30:00"."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, mins, secs = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, mins, secs = parts
    else:  # MM or MM:SS
        hours, mins, secs = 0, parts[0], parts[1] if len(parts) > 1 else 0
    return max(1, math.ceil((int(days or 0) * 1440 + hours * 60 + mins) + secs / 60))


def sbatch_options(lines: list[str]) -> dict[str, str | bool]:
    """``[launcher] sbatch`` lines as submitit's additional parameters ("--qos=high" -> {"qos": "high"})."""
    options: dict[str, str | bool] = {}
    for line in lines:
        match = SBATCH_OPTION.match(line.strip())
        if match:
            options[match.group(1).replace("-", "_")] = match.group(2).strip() if match.group(2) else True
    return options


def slurm_parameters(settings: LauncherSettings, nproc: int = 1, *, name: str = "vlab") -> dict:
    """The SlurmExecutor parameters of one job: one task per node; a one-node DDP job asks for at least
    ``nproc`` GPUs (when the job uses GPUs at all)."""
    gpus = settings.gpus_per_node
    if gpus and settings.nodes == 1:
        gpus = max(gpus, nproc)
    parameters: dict = {"job_name": name, "time": minutes(settings.time), "nodes": settings.nodes,
                        "ntasks_per_node": 1, "signal_delay_s": 120}
    if gpus:
        parameters["gpus_per_node"] = gpus
    if settings.partition:
        parameters["partition"] = settings.partition
    if settings.cpus_per_task:
        parameters["cpus_per_task"] = settings.cpus_per_task
    if settings.mem_gb:
        parameters["mem"] = f"{math.ceil(settings.mem_gb * 1024)}MB"
    if settings.setup:
        parameters["setup"] = list(settings.setup)
    extra = sbatch_options(settings.sbatch)
    if extra:
        parameters["additional_parameters"] = extra
    return parameters


def sbatch_script(settings: LauncherSettings, folder: Path, nproc: int = 1, *, name: str = "vlab",
                  command: str = "python -u -m submitit.core._submit FOLDER") -> str:
    """The sbatch file submitit writes for such a job (for checking the settings without a cluster)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(settings, nproc, name=name))


def make_executor(kind: str, folder: Path):
    """submitit's executor for ``kind`` ("slurm" or "submitit-local"), its files under ``folder``."""
    import submitit

    folder = Path(folder) / "%j"
    if kind == "submitit-local":
        return submitit.LocalExecutor(folder=folder)
    try:
        return submitit.SlurmExecutor(folder=folder)
    except RuntimeError:
        raise UserError("--launcher slurm: SLURM is not reachable here (no `srun` on the PATH). Run vlab on the "
                        "cluster's login node, or try the same path on this machine with --launcher "
                        "submitit-local.") from None


def job_parameters(kind: str, settings: LauncherSettings, nproc: int, name: str) -> dict:
    """The executor parameters of one job. The local executor's GPUs and cores are set through the job's
    environment (its lease), as for the local launcher; its time limit is ``[launcher] time``."""
    if kind == "slurm":
        return slurm_parameters(settings, nproc, name=name)
    return {"timeout_min": minutes(settings.time), "tasks_per_node": 1, "gpus_per_node": 0,
            "signal_delay_s": 120}


@dataclass
class SubmititHandle:
    """A submitted job, polled by the queue."""

    job: object  # submitit.Job
    kind: str
    lease: Lease | None = None

    @property
    def id(self) -> str:
        return str(self.job.job_id)

    def ended(self):
        from submitit.core.utils import UncompletedJobError

        if not self.job.done():
            return None
        if self.kind == "submitit-local" and not self.job.paths.result_pickle.exists():
            return Ended("killed", None, f"job {self.id} ended without a result: its process was killed")
        try:
            result = self.job.results()[0]
        except UncompletedJobError:
            return Ended("killed", None, f"job {self.id} ended without a result (state {self.job.state}); "
                                         f"its log: {self.job.paths.stderr}")
        except Exception as exc:  # the function raised despite catching: submitit's own failure
            return Ended("failed", None, f"job {self.id}: {str(exc).strip().splitlines()[-1]}")
        if not isinstance(result, dict):
            return Ended("failed", None, f"job {self.id} returned {result!r}")
        return Ended(result.get("status", "failed"), result.get("run"), result.get("error"))

    def stop(self, signum: int) -> None:
        """Ask the job to stop: it saves its run and ends as interrupted (resumable)."""
        if self.kind == "submitit-local":
            process = getattr(self.job, "_process", None)
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)  # the controller forwards SIGTERM to the job's task
        else:
            self.job.cancel(check=False)  # SLURM: SIGTERM, then SIGKILL after its KillWait

    def finish(self) -> None:
        pass
