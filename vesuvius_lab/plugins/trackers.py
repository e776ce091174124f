"""The built-in trackers: TensorBoard and MLflow (the ``trackers`` group).

Each factory returns an object with ``start``, ``log_metrics``, ``log_artifact`` and ``finish``:
the contract of :mod:`vesuvius_lab.core.training.tracking`. TensorBoard and MLflow are imported in
those methods, never when this module is imported, so listing plugins stays fast.

What the user gives each library is checked where it is cheap: an MLflow ``tracking_uri`` (or
``MLFLOW_TRACKING_URI``) of an unknown kind, a store MLflow will not open or a SQLite store that is
not a database is refused by ``vlab validate`` and every command that reads the experiment (or
``vesuvius.toml``), before a run exists (:func:`mlflow_uri_problem`). What fails later, while a run
trains (a server that is down, a store that breaks), is turned into one sentence in one place per
library (:func:`_mlflow_errors`, :func:`_tensorboard_errors`) and becomes the tracker's one warning.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vesuvius_lab.core.errors import brief
from vesuvius_lab.core.registry import plugin

# --------------------------------------------------------------------------- TensorBoard


class TensorBoardParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folder: str = Field("tensorboard", description="Folder of the event files, inside the run folder "
                                                   "(`tensorboard --logdir runs` shows every run).")
    images: bool = Field(True, description="Show the run's pictures (PNG, JPEG, GIF) under IMAGES.")

    @field_validator("folder")
    @classmethod
    def _inside_the_run(cls, folder: str) -> str:
        path = PurePosixPath(folder.replace("\\", "/"))
        if not folder.strip() or path.is_absolute() or ".." in path.parts:
            raise ValueError("give a folder name inside the run folder, e.g. \"tensorboard\"")
        return folder


@plugin(TensorBoardParams)
def tensorboard(params: TensorBoardParams, **context) -> "TensorBoardTracker":
    """TensorBoard event files in each run folder: scalars per epoch, the spec, summary and pictures."""
    return TensorBoardTracker(params)


def _tensorboard_errors(method: Callable) -> Callable:
    """TensorBoard's errors as one sentence: its event writer thread keeps what failed (an unwritable or
    full disk) and raises it at the next call, here."""

    @functools.wraps(method)
    def translated(self: "TensorBoardTracker", *args: Any) -> Any:
        from vesuvius_lab.core.errors import is_user_os_error, os_error_message
        from vesuvius_lab.core.training.tracking import TrackerError

        try:
            return method(self, *args)
        except OSError as exc:
            if not is_user_os_error(exc):
                raise
            raise TrackerError(f"its event files cannot be written: {os_error_message(exc)}") from exc

    return translated


class TensorBoardTracker:
    """Scalars as TensorBoard scalars (step = epoch), the params and summary as text, pictures as images.
    A resumed run adds an event file to the same folder, which TensorBoard reads as one run."""

    def __init__(self, params: TensorBoardParams):
        self.params, self.writer, self.step = params, None, 0

    @_tensorboard_errors
    def start(self, run_dir: Path, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / self.params.folder))
        rows = "".join(f"| {key} | {_cell(value)} |\n" for key, value in params.items())
        self.writer.add_text("params", "| key | value |\n| --- | --- |\n" + rows, 0)
        self.writer.flush()

    @_tensorboard_errors
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.step = max(self.step, step)
        self.writer.flush()  # so a TensorBoard watching the run shows each epoch at once

    @_tensorboard_errors
    def log_artifact(self, path: Path) -> None:
        if not self.params.images or Path(path).suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif"):
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(f"pictures/{Path(path).stem}", pixels, self.step, dataformats="HWC")

    @_tensorboard_errors
    def finish(self, summary: dict[str, Any], status: str) -> None:
        from vesuvius_lab.core.training.tracking import numbers

        step = summary.get("epochs") if isinstance(summary.get("epochs"), int) else self.step
        for name, value in numbers(summary, "summary/").items():
            self.writer.add_scalar(name, value, step)
        self.writer.add_text("summary", f"status: {status}\n\n```\n{json.dumps(summary, indent=2)}\n```", step)
        self.writer.close()


def _cell(value: Any) -> str:
    """A value in a Markdown table cell."""
    return _text(value).replace("|", "\\|")


def _text(value: Any) -> str:
    """A param's value as text: strings as they are, anything else as JSON (``[16, 8]``, ``null``)."""
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------- MLflow


class MLflowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(None, description=(
        "A tracking server (http://host:5000) or store URI. Default: MLFLOW_TRACKING_URI when set, else a local "
        "SQLite store in the runs folder, sqlite:///<runs>/.mlflow/mlflow.db (artifacts beside it)."))
    experiment: str | None = Field(None, description="MLflow experiment name; default the experiment's name.")
    artifacts: bool = Field(True, description="Log summary.json and the run's pictures as artifacts.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on every run.")
    timeout_s: int = Field(10, ge=1, description="Seconds a request to a tracking server may take.")
    retries: int = Field(1, ge=0, le=10, description="Retries of a failed request to a tracking server.")


#: URI schemes of the stores that MLflow's client opens (``postgresql+psycopg`` counts as ``postgresql``).
MLFLOW_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
SQLITE_HEADER = b"SQLite format 3\x00"


def mlflow_uri_problem(uri: str) -> str | None:
    """What is wrong with a tracking URI, found without contacting anything (None when nothing is)."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower().split("+")[0]
    if scheme in ("", "file") or re.fullmatch(r"[a-z]", scheme):  # a folder (a Windows drive letter too)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes"):
            return None
        return ("a folder (MLflow's file store), which this MLflow opens only with MLFLOW_ALLOW_FILE_STORE=true. "
                "Give a database store, e.g. sqlite:///path/mlflow.db, or leave tracking_uri out for a SQLite store "
                "in the runs folder")
    if scheme not in MLFLOW_SCHEMES:
        return (f'unknown kind of tracking URI "{scheme}:". Give a tracking server (http://host:5000) or a store '
                "such as sqlite:///path/mlflow.db")
    if scheme in ("http", "https") and not parsed.hostname:
        return "no host in the URL. Give the tracking server as http://host:port"
    if scheme == "sqlite":
        return sqlite_store_problem(uri)
    return None


def sqlite_store_problem(uri: str) -> str | None:
    """Why the SQLite store of ``sqlite:///path`` cannot be used (not a database, a folder, a folder that
    cannot be created or written), found before MLflow retries opening it for minutes."""
    path = uri.split("://", 1)[-1].split("?", 1)[0]
    path = path[1:] if path.startswith("/") else path  # sqlite:///relative, sqlite:////absolute
    if path in ("", ":memory:"):
        return None
    file = Path(path)
    if file.is_dir():
        return f"{file} is a folder; give the path of the store's database file, e.g. {file / 'mlflow.db'}"
    if file.exists():
        try:
            with open(file, "rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as exc:
            return f"{file} cannot be read ({exc.strerror or exc})"
        if header and header != SQLITE_HEADER:
            return f"{file} is not an SQLite database. Give another store, or move that file away"
        return None
    parent = next((p for p in file.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        return f"{parent} is a file, so the store {file} cannot be created there. Give another path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"the store {file} cannot be created: {parent} cannot be written. Give another path"
    return None


def check_mlflow(params: "MLflowParams", spec: Any) -> Iterator[tuple[str, str]]:
    """``vlab validate``'s check of the MLflow tracker: the tracking URI it will use."""
    if params.tracking_uri:
        problem = mlflow_uri_problem(params.tracking_uri)
        if problem:
            yield "tracking_uri", problem + "."
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        problem = mlflow_uri_problem(os.environ["MLFLOW_TRACKING_URI"])
        if problem:
            shown = _without_credentials(os.environ["MLFLOW_TRACKING_URI"])[:80]
            yield "", f"the MLFLOW_TRACKING_URI environment variable ({shown}): {problem}."


@plugin(MLflowParams, check=check_mlflow)
def mlflow(params: MLflowParams, *, runs_dir: Path | None = None, **context) -> "MLflowTracker":
    """MLflow: params, metrics per epoch, summary and pictures; a local store under the runs folder by default."""
    return MLflowTracker(params, Path(runs_dir) if runs_dir is not None else Path("runs"))


#: The file in the run folder that lets a resumed run continue its MLflow run.
MLFLOW_RECORD = "mlflow.json"
LOCAL_STORE = ".mlflow"
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


#: Loggers of MLflow and the HTTP client under it, quiet during a call: what fails is raised to the tracker
#: (synchronously), which turns it into one warning, instead of a log line per retry or per batch.
MLFLOW_LOGGERS = ("mlflow", "urllib3", "alembic")


@contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _mlflow_errors(method: Callable) -> Callable:
    """The one place where what MLflow raises becomes one sentence (see :func:`_mlflow_reason`)."""

    @functools.wraps(method)
    def translated(self: "MLflowTracker", *args: Any) -> Any:
        from vesuvius_lab.core.training.tracking import TrackerError

        with _quiet(MLFLOW_LOGGERS):
            try:
                return method(self, *args)
            except TrackerError:
                raise
            except Exception as exc:
                raise TrackerError(_mlflow_reason(exc, self.uri or "?", self.params.timeout_s)) from exc

    return translated


def _mlflow_reason(exc: BaseException, uri: str, timeout_s: int) -> str:
    """One sentence for an exception MLflow (or the HTTP or database client under it) raised for ``uri``."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(e) for e in chain)
    lower = text.lower()
    where = _without_credentials(uri)
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if "timed out" in lower or "timeout" in lower:
        return (f"the tracking server {where} did not answer within {timeout_s} s. Check the server, or raise the "
                "tracker's timeout_s")
    if any(sign in lower for sign in ("connection refused", "failed to establish", "max retries exceeded",
                                      "name or service not known", "nodename nor servname", "connectionerror")):
        cause = errno_text.group(1).strip() if errno_text else "no connection"
        return (f"the tracking server {where} cannot be reached ({cause}). Check that it runs and the URI's host "
                "and port")
    if re.search(r"\b(401|403)\b", text) or "unauthorized" in lower or "forbidden" in lower:
        return (f"the tracking server {where} refused the credentials. Give them through MLFLOW_TRACKING_TOKEN, or "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    code = re.search(r"error code (\d{3})", text)
    if code and code.group(1) == "404":
        return (f"{where} answered HTTP 404: no MLflow tracking server there. Check the URI's host, port and "
                "path")
    if code:
        return f"the tracking server {where} answered HTTP {code.group(1)} ({brief(chain[0], 120)})"
    if "readonly" in lower or "read-only" in lower:
        return f"the store {where} is read-only. Make it writable, or give another tracking_uri"
    if "not a database" in lower or "malformed" in lower:
        return f"the store {where} is damaged ({brief(chain[-1])}). Give another tracking_uri, or move that file away"
    if "unable to open database file" in lower:
        return f"the store {where} cannot be opened or created. Check its folder, or give another tracking_uri"
    from vesuvius_lab.core.errors import is_user_os_error, os_error_message

    failed = next((e for e in chain if isinstance(e, OSError) and is_user_os_error(e)), None)
    if failed is not None:
        return f"the store {where} cannot be used: {os_error_message(failed)}"
    return f"{type(chain[0]).__name__}: {brief(chain[0])}"


class MLflowTracker:
    """One MLflow run per vesuvius-lab run (name: the run id), in the experiment of the same name."""

    def __init__(self, params: MLflowParams, runs_dir: Path):
        self.params, self.runs_dir = params, runs_dir
        self.client, self.run_id, self.uri = None, None, None

    # ------------------------------------------------------------------ where

    def _store(self) -> tuple[str, str | None, Path | None]:
        """(tracking URI, artifact location for a new experiment, local store folder or None)."""
        uri = self.params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            self.uri = uri
            return uri, None, None
        folder = (self.runs_dir / LOCAL_STORE).resolve()
        self.uri = f"sqlite:///{folder / 'mlflow.db'}"
        folder.mkdir(parents=True, exist_ok=True)
        return self.uri, (folder / "artifacts").as_uri(), folder

    @_mlflow_errors
    def start(self, run_dir: Path, params: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        from vesuvius_lab.core.training.tracking import TrackerError

        uri, artifact_root, local = self._store()
        problem = mlflow_uri_problem(uri)  # e.g. a store damaged since: MLflow would retry it for minutes
        if problem:
            raise TrackerError(f"the store {_without_credentials(uri)} cannot be used: {problem}")
        if uri.startswith(("http://", "https://")):
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.params.timeout_s)
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.params.retries)
        name = self.params.experiment or Path(run_dir).parent.name
        with _locked(local):  # two runs starting at once must not both create the store or the experiment
            self.client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment_id(self.client, name, artifact_root)
        record_path = Path(run_dir) / MLFLOW_RECORD
        self.run_id = _continued_run(self.client, record_path, _without_credentials(uri))
        if self.run_id is None:
            tags = {"vlab.run_dir": str(Path(run_dir).resolve()), "vlab.experiment": Path(run_dir).parent.name,
                    **self.params.tags}
            self.run_id = self.client.create_run(experiment_id, run_name=Path(run_dir).name, tags=tags).info.run_id
            _write_json(record_path, {"tracking_uri": _without_credentials(uri), "run_id": self.run_id,
                                      "experiment_id": experiment_id})
        self._log_params(params)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self.client.get_run(self.run_id).data.params  # a resumed run: MLflow params never change
        new = [Param(_name(key), _text(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()
               if _name(key) not in logged]
        for first in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[first:first + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    def _log_numbers(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(_name(key), value, stamp, step) for key, value in metrics.items()]
        for first in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[first:first + 1000], synchronous=True)

    # ------------------------------------------------------------------ the contract

    @_mlflow_errors
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log_numbers(metrics, step)

    @_mlflow_errors
    def log_artifact(self, path: Path) -> None:
        if self.params.artifacts:
            self.client.log_artifact(self.run_id, str(path), artifact_path="pictures")

    @_mlflow_errors
    def finish(self, summary: dict[str, Any], status: str) -> None:
        from vesuvius_lab.core.training.tracking import numbers

        if summary:
            step = summary.get("epochs") if isinstance(summary.get("epochs"), int) else 0
            self._log_numbers(numbers(summary, "summary/"), step)
            if self.params.artifacts:
                self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


def _experiment_id(client, name: str, artifact_root: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = f"{artifact_root}/{_name(name)}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process on a server
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _continued_run(client, record_path: Path, uri: str) -> str | None:
    """The MLflow run a resumed run continues (recorded in the run folder, same store), or None."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("tracking_uri") != uri or not isinstance(record.get("run_id"), str):
        return None
    from mlflow.exceptions import MlflowException

    try:
        client.update_run(record["run_id"], status="RUNNING")
    except MlflowException:  # deleted from the store meanwhile: start a new MLflow run
        return None
    return record["run_id"]


class _locked:
    """An exclusive ``flock`` on ``<folder>/.lock`` (nothing when folder is None: a server locks by itself)."""

    def __init__(self, folder: Path | None):
        self.folder, self.fd = folder, None

    def __enter__(self):
        if self.folder is not None:
            import fcntl

            self.fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


def _name(key: str) -> str:
    """A metric or param name MLflow accepts: letters, digits, _ - . / space (``remove#2`` -> ``remove_2``)."""
    cleaned = re.sub(r"[^\w.\- /]", "_", str(key))
    return re.sub(r"/+", "/", cleaned).strip("/") or "_"


def _without_credentials(uri: str) -> str:
    """``https://user:token@host`` -> ``https://host``: the run folder keeps no secret."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1", uri, flags=re.IGNORECASE)


def _write_json(path: Path, data: dict) -> None:
    from vesuvius_lab.core.files import write_json_atomic

    write_json_atomic(path, data)
