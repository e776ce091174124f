"""``vesuvius.toml``: finding it, reading it, and the precedence of settings.

Precedence, highest first: command-line options, the environment (``VLAB_DATA``, ``VLAB_RUNS``),
the experiment file, ``vesuvius.toml``, built-in defaults. Relative paths in ``vesuvius.toml``
and in experiment files' ``data.root`` are relative to the project folder (the one holding
``vesuvius.toml``, or the working directory when there is none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from vesuvius_lab.core.config.experiment import (Problem, SpecError, non_finite_problems, pydantic_problems,
                                                 toml_source, tracker_problems)
from vesuvius_lab.core.config.spec import Experiment, ProjectSettings, TrackerRef
from vesuvius_lab.core.config.text import TextFileError, read_text
from vesuvius_lab.core.errors import UserError

PROJECT_FILE = "vesuvius.toml"


@dataclass(frozen=True)
class Project:
    """Project settings with absolute paths, and the folder they are relative to."""

    root: Path
    file: Path | None
    settings: ProjectSettings

    @property
    def data_root(self) -> Path:
        return self.absolute(Path(os.environ.get("VLAB_DATA") or self.settings.data_root))

    @property
    def runs_dir(self) -> Path:
        return self.absolute(Path(os.environ.get("VLAB_RUNS") or self.settings.runs_dir))

    @property
    def cache_dir(self) -> Path:
        return self.absolute(self.settings.cache_dir) if self.settings.cache_dir else self.runs_dir / ".cache"

    @property
    def launcher_dir(self) -> Path:
        """Where ``vlab run --launcher`` keeps submitit's job files and logs (``[launcher] folder``)."""
        folder = self.settings.launcher.folder
        return self.absolute(folder) if folder else self.runs_dir / ".submitit"

    def absolute(self, path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (self.root / path).resolve()

    def resolve(self, exp: Experiment) -> Experiment:
        """Fill the experiment's unset fields from the project, honouring the precedence above."""
        env_data = os.environ.get("VLAB_DATA")
        data_root = self.absolute(Path(env_data) if env_data else exp.data.root or self.settings.data_root)
        data = exp.data.model_copy(update={"root": data_root, "folds": exp.data.folds or self.settings.folds})
        train = exp.train.model_copy(update={
            "seed": self.settings.seed if exp.train.seed is None else exp.train.seed,
            "workers": self.settings.workers if exp.train.workers is None else exp.train.workers,
        })
        return exp.model_copy(update={"data": data, "train": train,
                                      "tracker": merge_trackers(self.settings.tracker, exp.tracker)})

    def with_overrides(self, *, data: str | None = None, runs: str | None = None,
                       device: str | None = None) -> "Project":
        """Apply command-line options; they beat the environment, so they are written into it."""
        if data:
            os.environ["VLAB_DATA"] = str(Path(data).resolve())
        if runs:
            os.environ["VLAB_RUNS"] = str(Path(runs).resolve())
        settings = self.settings.model_copy(update={"device": device}) if device else self.settings
        return Project(self.root, self.file, settings)


def merge_trackers(project: list[TrackerRef], experiment: list[TrackerRef]) -> list[TrackerRef]:
    """The project's trackers, less those whose plugin the experiment names too, then the experiment's
    (so an experiment's ``[[tracker]]`` replaces the project's of the same plugin; idempotent)."""
    named = {ref.plugin for ref in experiment}
    return [ref for ref in project if ref.plugin not in named] + list(experiment)


def find_project_file(start: Path | None = None) -> Path | None:
    """The nearest ``vesuvius.toml`` in ``start`` or any folder above it (one that cannot be read too:
    skipping it would silently drop the project's settings)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PROJECT_FILE
        if os.path.lexists(candidate):
            return candidate
    return None


def load_project(path: Path | None = None) -> Project:
    """Read ``path`` (or the nearest ``vesuvius.toml``); defaults when there is none."""
    found = path is None
    path = path or find_project_file()
    if path is None:
        return Project(Path.cwd().resolve(), None, ProjectSettings())
    path = Path(os.path.realpath(path))  # not resolve(): before Python 3.13 it raises on a symlink loop
    try:
        text = read_text(path)
    except TextFileError as exc:
        if not exc.missing:
            raise
        raise UserError(f"{path}: " + ("a symbolic link to a file that does not exist. Fix the link or remove it."
                                       if found else "project file not found. Pass an existing file to --project, "
                                       f"or drop the option to use the nearest {PROJECT_FILE}.")) from None
    problems: list[Problem] = []
    source = toml_source(path, text, problems)
    settings = None
    if source is not None:
        problems += non_finite_problems(source)
        try:
            settings = ProjectSettings.model_validate(source.data)
        except ValidationError as exc:
            problems += pydantic_problems(exc, source, ProjectSettings)
        problems += tracker_problems(source)
    if problems:
        raise SpecError(problems)
    return Project(path.parent, path, settings)
