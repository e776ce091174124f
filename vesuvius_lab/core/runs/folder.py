"""Run directories and their records.

``runs/<experiment>/<run-id>/`` holds::

    spec.json          the resolved experiment (what actually ran)
    env.json           versions, git commit and dirty flag, seed, command line, world size, device
    status.json        running / finished / failed / interrupted, with pid, host and a heartbeat
    metrics.jsonl      one line per epoch: loss terms, lr, samples/s, validation scores
    scores.json        per-volume validation scores of the best checkpoint, and per post-processing step
    summary.json       the final numbers the leaderboard reads
    checkpoints/       last.pt and best.pt
    log.txt            what was printed

Every JSON file is written atomically; ``metrics.jsonl`` is appended line by line and a reader
skips a torn last line. A run killed with SIGKILL cannot mark itself: its status stays
``running`` and readers see that its process is gone (:func:`effective_state`).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.errors import UserError, brief
from vesuvius_lab.core.files import write_json_atomic

#: The record of a tuning run (``vlab tune``): its presence makes a run of the kind "tuned".
TUNING_RECORD = "tuning.json"

#: Keys of status.json that explain one state only, dropped when the state changes.
STATE_DETAILS = ("error", "signal")

PACKAGES = ("vesuvius-lab", "torch", "monai", "segmentation-models-pytorch", "nnunetv2", "numpy")


@dataclass(frozen=True, order=True)
class Run:
    """A run directory and accessors for its records."""

    path: Path

    @property
    def experiment(self) -> str:
        return self.path.parent.name

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def read(self, name: str, default: Any = None) -> dict | Any:
        """A JSON record (always an object), or ``default`` when it does not exist (yet) or is damaged:
        not JSON, not UTF-8, or JSON that is not an object. Readers never fail on a damaged record."""
        try:
            record = json.loads((self.path / name).read_text())
        except (OSError, ValueError):  # missing, being replaced, or not (yet) valid JSON/UTF-8
            return default
        return record if isinstance(record, dict) else default

    def damaged(self, name: str) -> str | None:
        """Why the record ``name`` exists but cannot be read (not UTF-8, not JSON, not a JSON object, not
        readable), or None when it is readable or absent. :meth:`read` never tells the two apart."""
        try:
            text = (self.path / name).read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        except UnicodeDecodeError:
            return "not UTF-8 text"
        try:
            record = json.loads(text)
        except ValueError as exc:
            return f"not valid JSON ({exc})"
        return None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"

    def write(self, name: str, data: Any) -> None:
        write_json_atomic(self.path / name, data)

    def metrics(self) -> list[dict]:
        """The per-epoch records; a line being written right now is skipped."""
        try:
            lines = (self.path / "metrics.jsonl").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def set_status(self, state: str, **extra: Any) -> None:
        """Record the run's state; what explained an earlier state (its error, the signal that stopped it)
        goes, so a run resumed after a failure and finished carries no stale error."""
        status = {k: v for k, v in self.read("status.json", {}).items() if k not in STATE_DETAILS} | extra
        status.update(state=state, pid=os.getpid(), host=socket.gethostname(), updated=_now())
        self.write("status.json", status)

    def log(self, text: str) -> None:
        with open(self.path / "log.txt", "a") as handle:
            handle.write(text.rstrip("\n") + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run(runs_dir: Path, experiment: str, fold: int) -> Run:
    """Create ``runs/<experiment>/fold<k>-<timestamp>[-n]/`` without clashing with a concurrent run."""
    parent = runs_dir / experiment
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = parent / (f"fold{fold}-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            path.mkdir()  # atomic: two processes never get the same folder
        except FileExistsError:
            continue
        (path / "checkpoints").mkdir()
        return Run(path)
    raise RuntimeError(f"could not create a run folder under {parent}")


def open_run(path: Path) -> Run:
    """An existing run directory, or a clear error."""
    path = Path(path)
    if not (path / "spec.json").is_file():
        raise UserError(f"{path}: not a run directory (no spec.json). Runs live in "
                        "<runs_dir>/<experiment>/<run-id>/; `vlab leaderboard --runs` lists them.")
    return Run(path.resolve())


def read_spec(run: Run) -> Experiment:
    """The run's resolved experiment, or a clear error when its spec.json is damaged or no longer valid."""
    try:
        return Experiment.model_validate(run.read("spec.json"))
    except (ValidationError, ValueError, TypeError) as exc:
        problem = brief(exc, 300)
        raise UserError(f"{run.path / 'spec.json'}: not a valid experiment record ({problem}). The run cannot be "
                        "resumed or used to predict; train the experiment again (the file may have been edited, "
                        "or written by another version of vesuvius-lab).") from None


def find_runs(runs_dir: Path) -> list[Run]:
    """Every run directory under ``runs_dir`` (hidden folders such as the cache are skipped)."""
    if not runs_dir.is_dir():
        return []
    return sorted(Run(p.parent) for p in runs_dir.glob("[!.]*/*/spec.json"))


def latest_finished(experiment_dir: Path) -> Run | None:
    """The newest finished run in ``runs/<experiment>/``, if any."""
    finished = [Run(p.parent) for p in Path(experiment_dir).glob("*/spec.json")]
    finished = [run for run in finished if effective_state(run) == "finished"]
    return max(finished, key=lambda run: (run.read("status.json", {}).get("updated", ""), run.id), default=None)


def damaged_run(runs_dir: Path, experiment: str, fold: int | str | None = None,
                records: tuple[str, ...] = ("spec.json", "status.json")) -> tuple[Run, str, str] | None:
    """A run of ``experiment`` (and ``fold``, told by its folder name ``fold<k>-...``) that a command going on
    from earlier work cannot judge, because one of its ``records`` is damaged: (run, record, why). A command
    asked to continue or skip never replaces such a run with a new one unasked (see
    :func:`damaged_run_error`). Failed runs are never continued, so they do not count."""
    prefix = f"fold{fold}-" if fold is not None else ""
    folder = Path(runs_dir) / experiment
    candidates = sorted((p for p in folder.glob(f"{prefix}*") if p.is_dir()), reverse=True) if folder.is_dir() else []
    for path in candidates:
        run = Run(path)
        damaged = [(record, reason) for record in records if (reason := run.damaged(record))]
        if damaged and effective_state(run) != "failed":
            return (run, *damaged[0])
    return None


def damaged_run_error(run: Run, record: str, reason: str, command: str) -> UserError:
    """The message for :func:`damaged_run`: which file, and how to start anew (``command`` is the user's own
    command, given again with ``--force``)."""
    return UserError(f"{run.path / record}: damaged ({reason}), so it cannot be told whether run {run.path} is the "
                     f"one to continue (or finished already). Start anew with `{command} --force` (that folder stays "
                     "as it is), or repair or remove the folder and run the same command again.")


def effective_state(run: Run) -> str:
    """The recorded state, except that a "running" run whose process is gone is "killed"."""
    status = run.read("status.json", {})
    state = status.get("state")
    if not isinstance(state, str):
        return "unknown"
    if state == "running" and status.get("host") == socket.gethostname() and not _alive(status.get("pid")):
        return "killed"
    return state


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def git_state(cwd: Path) -> dict:
    """The commit and dirty flag of the repository around ``cwd`` (None outside a repository)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def environment(*, seed: int, world_size: int, device: str, cwd: Path) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_state(cwd),
        "seed": seed,
        "command": sys.argv,
        "world_size": world_size,
        "device": device,
        "host": socket.gethostname(),
        "started": _now(),
        "started_unix": time.time(),
    }
