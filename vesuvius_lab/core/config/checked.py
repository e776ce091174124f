"""The one way every command reads an experiment file: every check ``vlab validate`` makes, in one place.

``vlab validate``, ``train``, ``run``, ``ensemble``, ``tune`` and ``postprocess`` all read their files
through :func:`check_experiment` (or :func:`read_experiment`, its experiment alone), so a file that
``vlab validate`` refuses is refused by every command, with the same messages, before anything is
created, and a check added here is made everywhere. The checks, all reported at once:

- the document itself (:func:`~vesuvius_lab.core.config.experiment.load_experiment`): syntax,
  ``extends``, ``--set``, types, unknown keys, plugins and their params, plugins' own checks;
- every combination of its ``[sweep]``, validated as a hand-written file would be;
- its ``[tune]`` space: only tunable keys, and every end of a range and every choice accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vesuvius_lab.core.config.experiment import LoadedExperiment, Problem, SpecError, load_experiment
from vesuvius_lab.core.config.sweep import sweep_expansions, tune_problems
from vesuvius_lab.core.errors import UserError


@dataclass(frozen=True)
class CheckedExperiment:
    """An experiment file that passed every check: the file's own experiment and what it expands into."""

    base: LoadedExperiment
    expanded: list[LoadedExperiment]  # one per [sweep] combination; empty without a [sweep]

    @property
    def experiments(self) -> list[LoadedExperiment]:
        """What ``vlab run`` trains: the combinations of the sweep, or the file's experiment."""
        return self.expanded or [self.base]


def check_experiment(path: str | Path, overrides: Iterable[str] = ()) -> CheckedExperiment:
    """Every check of one experiment file with ``--set`` overrides; raise :class:`SpecError` listing every
    problem of the file, of every ``[sweep]`` combination and of its ``[tune]`` space."""
    overrides = list(overrides)
    base = load_experiment(path, overrides)
    expanded, problems = sweep_expansions(base, path, overrides)
    problems += tune_problems(base, path, overrides)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))
    return CheckedExperiment(base, expanded)


def read_experiment(path: str | Path, overrides: Iterable[str] = ()) -> LoadedExperiment:
    """The experiment of one file (not expanded), after every check of :func:`check_experiment`."""
    return check_experiment(path, overrides).base


def expand(path: str | Path, overrides: Iterable[str] = ()) -> list[LoadedExperiment]:
    """The experiments of one file, ``[sweep]`` expanded, after every check (:func:`check_experiment`)."""
    return check_experiment(path, overrides).experiments


def check_files(paths: Iterable[str | Path],
                overrides: Iterable[str] = ()) -> tuple[list[LoadedExperiment], list[Problem]]:
    """Every experiment of several files (sweeps expanded) and every problem of every file."""
    loaded, problems = [], []
    for path in paths:
        try:
            loaded.extend(check_experiment(path, overrides).experiments)
        except SpecError as exc:
            problems.extend(exc.problems)
        except UserError as exc:
            problems.append(Problem(str(path), None, "", str(exc)))
    return loaded, list(dict.fromkeys(problems))  # a parent shared by several files: reported once
