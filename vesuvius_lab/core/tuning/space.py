"""The search space of ``[tune]``: Optuna suggestions, and a trial's values applied to the spec."""

from __future__ import annotations

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
