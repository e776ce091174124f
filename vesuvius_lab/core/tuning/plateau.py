"""Prefer plateaus to peaks: choose the chain whose neighbourhood scores well, not the sharpest trial.

The best trial of a search is the best of many noisy tries on few volumes; a value at the top of a
narrow peak is the one most likely to move when the data does. With ``plateau = r`` (a share of
each key's range), the best few trials are each re-scored at their neighbours (every key moved by
``r`` down and up, one at a time, on the log scale for a log range; the adjacent choices for numeric
choices) and the candidate whose neighbourhood (itself and its neighbours) has the best mean is
chosen. A neighbour the steps refuse (a hysteresis low above its high) counts as the worst score of
the neighbourhood: a point on the edge of a cliff is no plateau. The record says how flat the chosen
point is: its own score, its neighbourhood's mean and worst, and the drop from one to the other.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from vesuvius_lab.core.config.spec import TuneRange
from vesuvius_lab.core.tuning.space import position, value_at

#: How many of the best trials are candidates.
CANDIDATES = 4


def neighbours(space: Mapping[str, TuneRange], values: Mapping[str, Any], radius: float) -> list[dict[str, Any]]:
    """The chains around ``values``: each key moved by ``radius`` of its range down and up, one at a time."""
    found: list[dict[str, Any]] = []
    for key, dimension in space.items():
        if key not in values:
            continue
        for moved in _moves(dimension, values[key], radius):
            neighbour = {**values, key: moved}
            if moved != values[key] and neighbour not in found:
                found.append(neighbour)
    return found


def _moves(dimension: TuneRange, value: Any, radius: float) -> list[Any]:
    where = position(dimension, value)
    if where is None:
        return []
    if dimension.choices is not None:
        ordered = sorted(dimension.choices)
        index = round(where * (len(ordered) - 1))  # position() is the index among the sorted choices
        return [ordered[i] for i in (index - 1, index + 1) if 0 <= i < len(ordered)]
    moves = []
    for direction in (-1, 1):
        moved = value_at(dimension, min(1.0, max(0.0, where + direction * radius)))
        unit = dimension.step or (1 if dimension.integer else None)
        if moved == value and unit is not None:  # a radius below one step still moves by one, inside the range
            moved = value + direction * unit
            moved = moved if dimension.low <= moved <= dimension.high else value
        moves.append(moved)
    return moves


def choose(space: Mapping[str, TuneRange], trials: Sequence[tuple[dict[str, Any], float]], radius: float,
           evaluate: Callable[[dict[str, Any]], float | None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the values chosen, the record of the choice) among ``trials`` ((values, objective) of each scored
    trial); ``evaluate(values)`` is the objective of other values (None when the steps refuse them)."""
    best = sorted(trials, key=lambda trial: trial[1], reverse=True)
    candidates = []
    seen: list[dict] = []
    for values, score in best:
        if values in seen:
            continue
        seen.append(values)
        scored = [evaluate(n) for n in neighbours(space, values, radius)]
        around = [s for s in scored if s is not None]
        worst = min([score, *around])
        # a neighbour the steps refuse (low above high) is the edge of a cliff: it counts as the worst one
        neighbourhood = [score, *(worst if s is None else s for s in scored)]
        candidates.append({"values": values, "score": score, "neighbourhood": sum(neighbourhood) / len(neighbourhood),
                           "worst": worst, "neighbours": len(around), "refused": len(scored) - len(around)})
        if len(candidates) == CANDIDATES:
            break
    chosen = max(candidates, key=lambda c: c["neighbourhood"])
    record = {"radius": radius, "candidates": candidates, "chosen": candidates.index(chosen),
              "score": chosen["score"], "neighbourhood": chosen["neighbourhood"], "worst": chosen["worst"],
              "drop": chosen["score"] - chosen["neighbourhood"]}
    return dict(chosen["values"]), record
