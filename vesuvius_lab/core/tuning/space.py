"""The search space of ``[tune]``: Optuna suggestions, and a trial's values applied to the spec."""

from __future__ import annotations

import math
from typing import Any

from vesuvius_lab.core.config.spec import Experiment, TuneRange


def suggest(trial: Any, key: str, dimension: TuneRange) -> Any:
    """Optuna's suggestion for one dimension (choices that are not scalars are suggested by index)."""
    if dimension.choices is not None:
        choices = dimension.choices
        if all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            return trial.suggest_categorical(key, choices)
        return choices[trial.suggest_categorical(f"{key}#index", list(range(len(choices))))]
    if dimension.integer:
        return trial.suggest_int(key, int(dimension.low), int(dimension.high), log=dimension.log,
                                 step=int(dimension.step or 1))
    return trial.suggest_float(key, float(dimension.low), float(dimension.high), log=dimension.log,
                               step=float(dimension.step) if dimension.step else None)


def values_of(params: dict[str, Any], space: dict[str, TuneRange]) -> dict[str, Any]:
    """A finished trial's params as ``{key: value}`` (index suggestions mapped back to their choice)."""
    values = {}
    for key, dimension in space.items():
        if key in params:
            values[key] = params[key]
        elif f"{key}#index" in params:
            values[key] = dimension.choices[params[f"{key}#index"]]
    return values


def current_values(spec: Experiment, space: dict[str, TuneRange]) -> dict[str, Any]:
    """The spec's own value of every key (the untuned chain), where it lies inside the space."""
    document = spec.model_dump(mode="json")
    values = {}
    for key, dimension in space.items():
        try:
            value = _get(document, key.split("."))
        except (KeyError, IndexError, ValueError, TypeError):
            continue
        inside = value in dimension.choices if dimension.choices is not None else \
            isinstance(value, (int, float)) and dimension.low <= value <= dimension.high
        if inside:
            values[key] = value
    return values


def apply_values(spec: Experiment, values: dict[str, Any]) -> Experiment:
    """The spec with each dotted key set to its value (list items by index), validated again."""
    document = spec.model_dump(mode="json")
    for key, value in values.items():
        *parents, last = key.split(".")
        container = _get(document, parents)
        if isinstance(container, list):
            container[int(last)] = value
        else:
            container[last] = value
    return Experiment.model_validate(document)


def _get(document: Any, parts: list[str]) -> Any:
    for part in parts:
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


# --------------------------------------------------------------------------- coordinates in a dimension


def position(dimension: TuneRange, value: Any) -> float | None:
    """Where ``value`` lies in its dimension, 0 at the low end and 1 at the high end (on the log scale for
    a log range; the index among sorted numeric choices); None for choices that are not numbers."""
    if dimension.choices is not None:
        numeric = numeric_choices(dimension.choices)
        if numeric is None or len(numeric) < 2 or not is_number(value):
            return None
        ordered = sorted(numeric)
        return ordered.index(min(ordered, key=lambda c: abs(c - value))) / (len(ordered) - 1)
    if not is_number(value):
        return None
    low, high, value = float(dimension.low), top(dimension), float(value)
    if dimension.log:
        low, high, value = math.log(low), math.log(high), math.log(max(value, 1e-300))
    return min(1.0, max(0.0, (value - low) / (high - low)))


def value_at(dimension: TuneRange, where: float) -> Any:
    """The value at ``where`` (0..1) of a range, snapped to its integers or step."""
    low, high = float(dimension.low), top(dimension)
    value = math.exp(math.log(low) + where * (math.log(high) - math.log(low))) if dimension.log else \
        low + where * (high - low)
    if dimension.step:
        value = low + round((value - low) / float(dimension.step)) * float(dimension.step)
    if dimension.integer:
        return int(round(value))
    return float(min(high, max(low, value)))


def top(dimension: TuneRange) -> float:
    """The highest value a range can take: its high, or the last multiple of its step below it (as Optuna)."""
    low, high = float(dimension.low), float(dimension.high)
    if dimension.step:
        return low + math.floor((high - low) / float(dimension.step) + 1e-9) * float(dimension.step)
    return high


def numeric_choices(choices: list[Any]) -> list[float] | None:
    return [float(c) for c in choices] if all(is_number(c) for c in choices) else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
