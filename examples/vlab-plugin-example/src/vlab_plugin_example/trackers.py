"""A tracker plugin: every call a run makes to its trackers, as one JSON line each, in a file of the run folder.

A tracker is any object with these four methods (the contract is in the docstring of
``vesuvius_lab/core/training/tracking.py``). This one writes lines; a W&B or ClearML tracker makes
the same four calls to its service: the comments show where. Whatever a tracker raises is caught
by vesuvius-lab, warned about once, and training goes on without that tracker.
"""

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vesuvius_lab.core.registry import plugin


class JsonLinesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field("events.jsonl", description="File name, inside the run folder.")

    @field_validator("file")
    @classmethod
    def _plain_name(cls, file: str) -> str:
        if not file or Path(file).name != file:
            raise ValueError('give a file name without folders, e.g. "events.jsonl"')
        return file


class JsonLinesTracker:
    def __init__(self, params: JsonLinesParams):
        self.params, self.path = params, None

    def _write(self, event: str, **fields) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def start(self, run_dir: Path, params: dict) -> None:
        """The run starts or resumes; params is the resolved spec as dotted keys ("train.lr": 0.001)."""
        # W&B:     wandb.init(project=run_dir.parent.name, name=run_dir.name, id=<kept in run_dir>,
        #                     resume="allow", config=params, dir=run_dir)
        # ClearML: Task.init(project_name=run_dir.parent.name, task_name=run_dir.name).connect(params)
        self.path = Path(run_dir) / self.params.file
        self._write("start", run=Path(run_dir).name, experiment=Path(run_dir).parent.name, params=params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """One epoch's scalars ("loss", "loss/dice", "lr", "val/score", ...); step is the epoch."""
        # W&B: wandb.log(metrics, step=step)    ClearML: logger.report_scalar(title, series, value, step)
        self._write("metrics", step=step, metrics=metrics)

    def log_artifact(self, path: Path) -> None:
        """A picture of the finished run."""
        # W&B: wandb.log({Path(path).stem: wandb.Image(str(path))})    ClearML: logger.report_image(...)
        self._write("artifact", path=str(path))

    def finish(self, summary: dict, status: str) -> None:
        """Last call: summary.json ({} unless the run finished) and "finished", "failed" or "interrupted"."""
        # W&B: wandb.run.summary.update(summary); wandb.finish(exit_code=0 if status == "finished" else 1)
        self._write("finish", status=status, summary=summary)


@plugin(JsonLinesParams)
def jsonl_events(params: JsonLinesParams, **context) -> JsonLinesTracker:
    """Each tracker call of a run as a JSON line in a file of its run folder (a template for W&B, ClearML...)."""
    return JsonLinesTracker(params)
