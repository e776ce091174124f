"""Reading run records for reports: tolerant of missing, half-written or damaged files.

Also the flattened view of specs that the leaderboard and ``vlab compare`` diff: nested tables
become dotted keys (``model.params.encoder``), lists of tables get indices (``loss.0.weight``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vesuvius_lab.core.contract.backend import COMPONENT_KEYS
from vesuvius_lab.core.config.spec import TUNING_FIELDS, Experiment, ensemble_column
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.runs.folder import Run, effective_state, find_runs, latest_finished

#: Spec keys never shown as differing columns: identity, paths, the fold, where a run is watched
#: (its trackers), and what the plugin columns already show.
HIDDEN_SPEC_KEYS = ("name", "description", "extends", "data.root", "data.fold", "sweep", *TUNING_FIELDS, "tracker",
                    "model.plugin", "inference.blend.plugin")
HIDDEN_SPEC_PATTERNS = (("loss", "plugin"), ("loss", "weight"), ("postprocess", "plugin"))


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class RunRecord:
    """One run's records as read right now (each one empty when unreadable)."""

    run: Run
    state: str
    spec: dict
    summary: dict
    env: dict
    status: dict

    @property
    def experiment(self) -> str:
        name = self.spec.get("name")
        return name if isinstance(name, str) and name else self.run.experiment

    @property
    def fold(self) -> int | None:
        fold = _as_dict(self.spec.get("data")).get("fold", self.summary.get("fold"))
        return fold if isinstance(fold, int) else None

    @property
    def all_data(self) -> bool:
        """Trained with data.fold = "all": on every volume, so never validated."""
        return _as_dict(self.spec.get("data")).get("fold") == "all"

    @property
    def folds(self) -> int | None:
        folds = _as_dict(self.spec.get("data")).get("folds")
        return folds if isinstance(folds, int) else None

    @property
    def score(self) -> float | None:
        value = self.summary.get("score")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def ranked(self) -> bool:
        return self.state == "finished" and self.score is not None

    @property
    def started(self) -> float:
        value = self.env.get("started_unix")
        return float(value) if isinstance(value, (int, float)) else 0.0

    def number(self, summary_key: str) -> float | None:
        value = self.summary.get(summary_key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def plugins(self) -> dict[str, str]:
        """The model, loss, blend and post-processing the run really used (see :func:`plugin_summary`)."""
        return plugin_summary(self.spec, self.summary.get("components"))

    @property
    def commit(self) -> str | None:
        git = _as_dict(self.env.get("git"))
        commit = git.get("commit")
        if not isinstance(commit, str):
            return None
        return commit + ("*" if git.get("dirty") else "")


def normalized_spec(raw: Any) -> dict:
    """The spec with today's defaults filled in, so that a field added since the run does not count as a
    difference; the raw record when it no longer validates."""
    if not isinstance(raw, dict):
        return {}
    try:
        return Experiment.model_validate(raw).model_dump(mode="json")
    except (ValidationError, ValueError, TypeError):
        return raw


def read_run(run: Run) -> RunRecord:
    """Read one run; never raises for missing or damaged records."""
    try:
        state = effective_state(run)
    except ValueError:  # a damaged status.json (not text)
        state = "unknown"
    return RunRecord(run, state, normalized_spec(run.read("spec.json")), _as_dict(run.read("summary.json")),
                     _as_dict(run.read("env.json")), _as_dict(run.read("status.json")))


def read_runs(runs_dir: Path) -> list[RunRecord]:
    return [read_run(run) for run in find_runs(Path(runs_dir))]


def resolve_run(text: str, runs_dir: Path) -> Run:
    """A run folder given as a path or relative to the runs directory (``experiment/run-id``), or an
    experiment name, meaning its newest finished run."""
    for candidate in (Path(text), Path(runs_dir) / text):
        if (candidate / "spec.json").is_file():
            return Run(candidate.resolve())
    for candidate in (Path(text), Path(runs_dir) / text):
        if candidate.is_dir() and (run := latest_finished(candidate)) is not None:
            return Run(run.path.resolve())
    raise UserError(f"{text}: not a run directory (no spec.json there, nor under {runs_dir}) nor an experiment "
                    "with a finished run. Give a path such as runs/<experiment>/<run-id>, or an experiment name; "
                    "`vlab leaderboard --runs` lists the runs.")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted keys; lists of plain values stay whole, lists of tables get indices."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}{index}."))
        return flat
    return {prefix[:-1]: value}


def _hidden(key: str) -> bool:
    if key in HIDDEN_SPEC_KEYS or any(key.startswith(k + ".") for k in ("sweep", *TUNING_FIELDS, "tracker")):
        return True
    parts = key.split(".")
    return len(parts) == 3 and parts[1].isdigit() and (parts[0], parts[2]) in HIDDEN_SPEC_PATTERNS


def comparable_spec(spec: dict) -> dict[str, Any]:
    """The flattened spec without the keys that never count as a difference (see HIDDEN_SPEC_KEYS)."""
    return {key: value for key, value in flatten(spec).items() if not _hidden(key)}


def differing_keys(specs: list[dict[str, Any]]) -> list[str]:
    """Keys (of flattened comparable specs) whose values are not all the same; absent counts as a value."""
    keys = list(dict.fromkeys(key for spec in specs for key in spec))
    # An empty list of tables in one spec is not a difference of its own: the keys inside differ.
    keys = [key for key in keys if not any(other.startswith(key + ".") for spec in specs for other in spec)]
    return [key for key in keys
            if len({json.dumps(spec.get(key, "\0absent"), sort_keys=True, default=str) for spec in specs}) > 1]


def plugin_summary(spec: dict, components: Any = None) -> dict[str, str]:
    """The model, loss, blend and post-processing columns of a spec; ``components`` (a run summary's,
    written for backends that use their own loss or blending) replaces what the run did not use."""
    def name(table: Any) -> str:
        return str(_as_dict(table).get("plugin", "?"))

    losses = [t for t in spec.get("loss", []) if isinstance(t, dict)] if isinstance(spec.get("loss"), list) else []
    steps = spec.get("postprocess") if isinstance(spec.get("postprocess"), list) else []
    if isinstance(spec.get("ensemble"), dict):  # an ensemble run: losses and blending are its members'
        return {"model": ensemble_column(spec["ensemble"]), "loss": "—", "blend": "—",
                "postprocess": " → ".join(name(step) for step in steps) or "—"}
    used = {key: value for key, value in _as_dict(components).items() if key in COMPONENT_KEYS and isinstance(value, str)}
    init = _as_dict(spec.get("train")).get("init")
    return {
        "model": name(spec.get("model")) + (f" (from {init})" if isinstance(init, str) and init else ""),
        "loss": " + ".join(f"{name(t)} {_short(t.get('weight', 1.0))}" if len(losses) > 1 else name(t)
                           for t in losses) or "?",
        "blend": name(_as_dict(spec.get("inference")).get("blend", {"plugin": "gaussian"})),
        "postprocess": " → ".join(name(step) for step in steps) or "—",
    } | used


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)
