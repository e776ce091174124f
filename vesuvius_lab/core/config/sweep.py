"""Sweeps: an experiment's ``[sweep]`` grid expanded into one experiment per combination; and the
checks of its ``[tune]`` search space, which are made the same way.

::

    name = "unet25d"
    [sweep]
    "model.params.encoder" = ["resnet18", "resnet34"]
    "train.lr" = [1e-3, 3e-4]

expands into four experiments named ``unet25d-encoder_resnet18-lr_0.001`` and so on. Each
combination is applied as command-line overrides (``--set model.params.encoder="resnet18"``)
through :func:`~vesuvius_lab.core.config.experiment.load_experiment`, after the user's own ``--set``,
so every expanded spec is validated exactly as a hand-written file would be. A problem found in
an expansion is reported at the sweep key's line, with the value that caused it. Commands never
call these helpers themselves: :mod:`vesuvius_lab.core.config.checked` applies them to every file
a command reads.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Iterable

from vesuvius_lab.core.config.experiment import COMMAND_LINE, LoadedExperiment, Problem, SpecError, load_experiment
from vesuvius_lab.core.config.text import clip, read_text
from vesuvius_lab.core.config.tomlpos import key_lines, line_of
from vesuvius_lab.core.errors import UserError

#: More combinations than this is almost certainly a mistake in the grid.
MAX_COMBINATIONS = 1000
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def toml_value(value: Any) -> str:
    """``value`` written as a TOML inline value, so that ``--set KEY=<it>`` reads it back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("-inf" if value < 0 else "inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def name_part(value: Any) -> str:
    """A value as it appears in a run name: ``[8, 64, 64]`` -> ``8x64x64``; unsafe characters -> ``_``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "x".join(name_part(item) for item in value)
    elif isinstance(value, dict):
        text = "_".join(f"{k}.{name_part(v)}" for k, v in value.items())
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return _NAME_UNSAFE.sub("_", text).strip("_") or "empty"


def key_labels(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that tells it apart: ``model.params.encoder`` -> ``encoder``."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for length in range(1, len(parts) + 1):
            label = ".".join(parts[-length:])
            if not any(other != key and other.split(".")[-length:] == parts[-length:] for other in keys):
                break
        labels[key] = label
    return labels


def sweep_name(base: str, values: dict[str, Any]) -> str:
    """``base-label_value-label_value`` for one combination (see :func:`key_labels`)."""
    labels = key_labels(list(values))
    return "-".join([base, *(f"{labels[key]}_{name_part(value)}" for key, value in values.items())])


def combinations(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid, as ``{key: value}``, the first key varying slowest."""
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[key] for key in keys))]


def sweep_expansions(base: LoadedExperiment, path: str | Path,
                     overrides: list[str]) -> tuple[list[LoadedExperiment], list[Problem]]:
    """One experiment per combination of ``base``'s ``[sweep]`` (none without one), each validated as a
    hand-written file would be, and every problem found, blamed on the sweep key that caused it."""
    sweep = base.spec.sweep
    if not sweep:
        return [], []
    grid = combinations(sweep)
    if len(grid) > MAX_COMBINATIONS:
        return [], [_problem_at_sweep(base, None, f"the [sweep] has {len(grid)} combinations (more than "
                                      f"{MAX_COMBINATIONS}). Sweep fewer keys or values, or split the file.")]
    problems: list[Problem] = []
    by_key: dict[tuple[str, str, str], list[str]] = {}  # (key, path, message) -> the values that caused it
    expanded: list[LoadedExperiment] = []
    names: dict[str, dict] = {}
    for values in grid:
        name = sweep_name(base.spec.name, values)
        if name in names:
            problems.append(_problem_at_sweep(base, None, f"the combinations {_show(names[name])} and "
                                              f"{_show(values)} both give the run name {name!r}. Make the "
                                              "values differ in letters or digits."))
            continue
        names[name] = values
        sets = {f"{key}={toml_value(value)}": key for key, value in values.items()}
        name_set = f"name={toml_value(name)}"
        try:
            loaded = load_experiment(path, [*overrides, "sweep={}", *sets, name_set])
        except SpecError as exc:
            problems.extend(_blame(exc.problems, base, values, sets, name_set, by_key))
            continue
        except UserError as exc:  # a key path through a value that is not a table
            problems.append(_problem_at_sweep(base, None, f"{_show(values)}: {exc}"))
            continue
        expanded.append(loaded)
    for (key, path_, message), causes in by_key.items():
        causes = list(dict.fromkeys(causes))
        every_value = len(causes) == len({toml_value(v) for v in sweep[key]}) > 1
        for cause in [None] if every_value else causes:  # a problem of the key itself: say it once
            problems.append(dataclasses.replace(_problem_at_sweep(base, key, message if cause is None else
                                                                  f"{key} = {clip(cause)}: {message}"), path=path_))
    return expanded, problems


#: What `vlab tune` may change: it re-runs the post-processing on cached probabilities, no network.
TUNABLE_PREFIXES = ("postprocess.", "inference.threshold")


def tune_problems(base: LoadedExperiment, path: str | Path, overrides: Iterable[str] = ()) -> list[Problem]:
    """Problems of the ``[tune]`` table: a key that is not tunable, or a value of its range that the
    experiment would refuse (each end of a range and every choice is tried as ``--set KEY=VALUE``)."""
    problems = []
    for key, dimension in base.spec.tune.items():
        if not key.startswith(TUNABLE_PREFIXES):
            problems.append(_problem_at_sweep(base, key, "vlab tune re-runs the post-processing on cached "
                                              "probabilities, so only postprocess.* keys and inference.threshold "
                                              "can be tuned. Sweep the others with [sweep].", table="tune"))
            continue
        failures: dict[str, list[Any]] = {}  # message -> the probe values that caused it
        for value in dimension.probes():
            setting = f"{key}={toml_value(value)}"
            try:
                load_experiment(path, [*overrides, "sweep={}", "tune={}", setting])
            except SpecError as exc:
                for problem in exc.problems:
                    if problem.file == f"{COMMAND_LINE} {setting}":
                        failures.setdefault(problem.message, []).append(value)
            except UserError as exc:
                failures.setdefault(str(exc), []).append(value)
        for message, values in failures.items():
            if len(values) == len(dimension.probes()) > 1:  # the key itself is wrong, whatever the value
                problems.append(_problem_at_sweep(base, key, message, table="tune"))
            else:
                problems.extend(_problem_at_sweep(base, key, f"{key} = {clip(toml_value(v))}: {message}",
                                                  table="tune") for v in values)
    return problems


def _show(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} = {clip(toml_value(value))}" for key, value in values.items())


def _sweep_line(base: LoadedExperiment, key: str | None, table: str = "sweep") -> tuple[str, int | None]:
    """The file and line of ``[sweep]`` (or ``[tune]``, or of one of its keys), looking through the
    extended files too."""
    for file in base.files:
        try:
            lines = key_lines(read_text(file))
        except UserError:
            continue
        if (table,) in lines or any(p[:1] == (table,) for p in lines):
            path = (table,) if key is None else (table, key)
            dotted = (table,) if key is None else (table, *key.split("."))
            return str(file), lines.get(path) or line_of(lines, dotted) or lines.get((table,))
    return str(base.file), None


def _problem_at_sweep(base: LoadedExperiment, key: str | None, message: str, table: str = "sweep") -> Problem:
    file, line = _sweep_line(base, key, table)
    return Problem(file, line, table if key is None else f'{table}."{key}"', message)


def _blame(problems: list[Problem], base: LoadedExperiment, values: dict[str, Any], sets: dict[str, str],
           name_set: str, by_key: dict[tuple[str, str, str], list[str]]) -> list[Problem]:
    """Point each problem of an expansion at the sweep key (and value) that caused it.

    Problems of a sweep key are collected in ``by_key`` (reported by :func:`expand`); the others
    are returned.
    """
    blamed = []
    for problem in problems:
        origin = problem.file.removeprefix(f"{COMMAND_LINE} ") if problem.file.startswith(COMMAND_LINE) else None
        if origin in sets:
            key = sets[origin]
            rest = problem.path.removeprefix(key).lstrip(".")
            path = f'sweep."{key}"' + (f".{rest}" if rest else "")
            by_key.setdefault((key, path, problem.message), []).append(toml_value(values[key]))
        elif origin == name_set:
            blamed.append(_problem_at_sweep(base, None, f"the expanded run name {name_set[5:]} is not "
                                            f"valid ({problem.message}). Shorten the name or the values."))
        elif origin is not None:
            blamed.append(problem)  # the user's own --set
        else:
            blamed.append(dataclasses.replace(problem, message=f"{problem.message} (with the sweep "
                                              f"combination {_show(values)})"))
    return blamed
