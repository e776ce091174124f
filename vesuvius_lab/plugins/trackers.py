"""The built-in trackers: TensorBoard and MLflow (the ``trackers`` group).

Each factory returns an object with ``start``, ``log_metrics``, ``log_artifact`` and ``finish``:
the contract of :mod:`vesuvius_lab.core.training.tracking`. TensorBoard and MLflow are imported in
those methods, never when this module is imported, so listing plugins stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class TensorBoardTracker:
    """Scalars as TensorBoard scalars (step = epoch), the params and summary as text, pictures as images.
    A resumed run adds an event file to the same folder, which TensorBoard reads as one run."""

    def __init__(self, params: TensorBoardParams):
        self.params, self.writer, self.step = params, None, 0

    def start(self, run_dir: Path, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / self.params.folder))
        rows = "".join(f"| {key} | {_cell(value)} |\n" for key, value in params.items())
        self.writer.add_text("params", "| key | value |\n| --- | --- |\n" + rows, 0)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.step = max(self.step, step)
        self.writer.flush()  # so a TensorBoard watching the run shows each epoch at once

    def log_artifact(self, path: Path) -> None:
        if not self.params.images or Path(path).suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif"):
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(f"pictures/{Path(path).stem}", pixels, self.step, dataformats="HWC")

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


@plugin(MLflowParams)
def mlflow(params: MLflowParams, *, runs_dir: Path | None = None, **context) -> "MLflowTracker":
    """MLflow: params, metrics per epoch, summary and pictures; a local store under the runs folder by default."""
    return MLflowTracker(params, Path(runs_dir) if runs_dir is not None else Path("runs"))


#: The file in the run folder that lets a resumed run continue its MLflow run.
MLFLOW_RECORD = "mlflow.json"
LOCAL_STORE = ".mlflow"
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class MLflowTracker:
    """One MLflow run per vesuvius-lab run (name: the run id), in the experiment of the same name."""

    def __init__(self, params: MLflowParams, runs_dir: Path):
        self.params, self.runs_dir = params, runs_dir
        self.client, self.run_id = None, None

    # ------------------------------------------------------------------ where

    def _store(self) -> tuple[str, str | None, Path | None]:
        """(tracking URI, artifact location for a new experiment, local store folder or None)."""
        uri = self.params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri, None, None
        folder = (self.runs_dir / LOCAL_STORE).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri(), folder

    def start(self, run_dir: Path, params: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        uri, artifact_root, local = self._store()
        if uri.startswith(("http://", "https://")):
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.params.timeout_s)
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.params.retries)
        for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
            logging.getLogger(name).setLevel(logging.WARNING)
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
            self.client.log_batch(self.run_id, params=new[first:first + MAX_PARAMS_TAGS_PER_BATCH])

    def _log_numbers(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(_name(key), value, stamp, step) for key, value in metrics.items()]
        for first in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[first:first + 1000])

    # ------------------------------------------------------------------ the contract

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log_numbers(metrics, step)

    def log_artifact(self, path: Path) -> None:
        if self.params.artifacts:
            self.client.log_artifact(self.run_id, str(path), artifact_path="pictures")

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
