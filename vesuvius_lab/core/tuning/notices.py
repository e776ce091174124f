"""What a careful user would check by eye after a search, said in words.

* **edge**: the chosen value of a key lies at the edge of its range, and the step accepts values
  beyond it: the best may lie outside, so widen the range.
* **flat**: the chosen chain's score hardly moves when one key goes through its whole range (its
  *profile*, scored at a few points): its value does not matter on these volumes (fix it, or drop it
  from ``[tune]``), and a tuned value of it is noise.
* **groups disagree**: the groups of volumes (scrolls, or folds) are each best at far-apart values
  of a key: a chain tuned on some groups may not hold on others.

Each is read from data the tune records (the finished trials with their per-volume scores, the
profiles), so it is checked on constructed studies as well as real ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vesuvius_lab.core.config.spec import TuneRange
from vesuvius_lab.core.tuning.objective import group_means
from vesuvius_lab.core.tuning.space import is_number, numeric_choices, position, value_at

#: A chosen value this close to an end of its range (as a share of the range) is at its edge.
EDGE = 0.05
#: A key is flat when the chosen chain's objective varies by less than this over the key's whole range.
FLAT = 0.002
#: Points of a range scored for its profile (a choice dimension: every choice).
PROFILE_POINTS = 5
#: Groups disagree when their best values of a key lie this far apart (as a share of its range)...
DISAGREE = 0.5
#: ...and the chosen chain scores this much below some group's own best (else nothing is lost).
DISAGREE_LOSS = 0.005


@dataclass(frozen=True)
class Notice:
    kind: str  # "edge", "flat" or "groups disagree"
    key: str | None
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def beyond(dimension: TuneRange, side: str, share: float = 0.25) -> Any:
    """A value ``share`` of the range past the ``side`` ("low" or "high") end, one unit at least for integers;
    None where no value lies past it (below 1 for an integer log range)."""
    if dimension.choices is not None:
        ordered = sorted(numeric_choices(dimension.choices))
        first, second = (ordered[0], ordered[1]) if side == "low" else (ordered[-1], ordered[-2])
        value = first + share / 0.25 * (first - second)
        if all(isinstance(c, int) for c in dimension.choices):
            return int(first + (-1 if side == "low" else 1) * max(1, round(abs(value - first))))
        return value
    low, high = float(dimension.low), float(dimension.high)
    if dimension.log:
        factor = (high / low) ** share
        value = low / factor if side == "low" else high * factor
    else:
        value = low - share * (high - low) if side == "low" else high + share * (high - low)
    if dimension.integer:
        value = math.floor(value) if side == "low" else math.ceil(value)
        value = min(value, int(dimension.low) - 1) if side == "low" else max(value, int(dimension.high) + 1)
        if dimension.log and value < 1:
            return None
    return value


def edge_notices(space: Mapping[str, TuneRange], chosen: Mapping[str, Any],
                 accepts: Callable[[str, Any], bool] = lambda key, value: True) -> list[Notice]:
    """A notice for each chosen value at an edge of its range that the step would let widen."""
    notices = []
    for key, dimension in space.items():
        if dimension.choices is not None and len(numeric_choices(dimension.choices) or []) < 3:
            continue  # two choices, or choices that are not numbers: every value is an "edge"
        where = position(dimension, chosen.get(key))
        if where is None or EDGE < where < 1 - EDGE:
            continue
        side = "low" if where <= EDGE else "high"
        probe = beyond(dimension, side, share=0.01)
        if probe is None or not accepts(key, probe):
            continue  # as far as the range or the step goes (a radius below 0, a threshold above 1)
        outside = beyond(dimension, side)
        span = f"[{_show(dimension.low)}, {_show(dimension.high)}]" if dimension.choices is None else \
            f"choices {list(dimension.choices)}"
        end = "lower" if side == "low" else "upper"
        notices.append(Notice("edge", key, f"{key} = {_show(chosen[key])} is at the {end} edge of its range {span}: "
                                           f"the best may lie beyond it; widen the range (e.g. to {_show(outside)}) "
                                           "and tune again.", {"side": side, "value": chosen[key], "try": outside}))
    return notices


def profiles(space: Mapping[str, TuneRange], chosen: Mapping[str, Any],
             evaluate: Callable[[dict[str, Any]], float | None]) -> dict[str, list[tuple[Any, float | None]]]:
    """For each key: the objective of the chosen chain with that key alone set to points across its range
    (None where the steps refuse the value)."""
    found = {}
    for key, dimension in space.items():
        if dimension.choices is not None:
            points = list(dimension.choices)
        else:
            points = list(dict.fromkeys(value_at(dimension, where) for where in np.linspace(0, 1, PROFILE_POINTS)))
        found[key] = [(point, evaluate({**chosen, key: point})) for point in points]
    return found


def flat_notices(space: Mapping[str, TuneRange], profiles: Mapping[str, Sequence[tuple[Any, float | None]]]) \
        -> list[Notice]:
    """A notice for each key whose profile (the chosen chain with the key moved across its range) is flat."""
    notices = []
    for key in space:
        scores = [score for _, score in profiles.get(key, ()) if score is not None]
        if len(scores) < 2:
            continue
        effect = max(scores) - min(scores)
        if effect < FLAT:
            notices.append(Notice("flat", key, f"{key} does not matter on these volumes: across its whole range the "
                                               f"chosen chain's score moves by {effect:.4f} only. Fix it (or drop it "
                                               "from [tune]); its tuned value is noise.", {"effect": effect}))
    return notices


def disagreement_notices(space: Mapping[str, TuneRange], trials: Sequence[Mapping], groups: Mapping[str, str],
                         chosen: Mapping[str, Any]) -> list[Notice]:
    """One notice when the groups' own best chains lie far apart on some key and the chosen chain loses on
    some group against that group's own best (what each loses is said)."""
    scored = [t for t in trials if is_number(t.get("score")) and t.get("volumes")
              and set(t["volumes"]) <= set(groups)]
    if len(set(groups.values())) < 2 or not scored:
        return []
    per_trial = [group_means(t["volumes"], groups) for t in scored]
    names = sorted(set(groups.values()))
    best: dict[str, int] = {g: max(range(len(scored)), key=lambda i: per_trial[i].get(g, -np.inf)) for g in names}
    far = {}
    for key, dimension in space.items():
        places = [position(dimension, scored[best[g]]["values"].get(key)) for g in names]
        if None not in places and max(places) - min(places) >= DISAGREE:
            far[key] = {g: scored[best[g]]["values"][key] for g in names}
    if not far:
        return []
    chosen_trial = next((i for i, t in enumerate(scored) if t["values"] == dict(chosen)), None)
    losses = {}
    if chosen_trial is not None:
        losses = {g: per_trial[best[g]][g] - per_trial[chosen_trial][g] for g in names}
        if max(losses.values()) < DISAGREE_LOSS:
            return []  # far apart, but the chosen chain is as good as each group's own best
    keys = "; ".join(f"{key}: " + ", ".join(f"{g} {_show(v)}" for g, v in values.items()) for key, values in far.items())
    lost = (" The chosen chain scores below each group's own best by " +
            ", ".join(f"{g} {loss:.4f}" for g, loss in losses.items()) + ".") if losses else ""
    return [Notice("groups disagree", None, f"the groups are best at far-apart values ({keys}).{lost} A chain tuned "
                                            "on some groups may not hold on others: look at each volume's "
                                            "scores (scores.json); objective = \"worst_group\" chooses the chain "
                                            "that suits the group it suits least.",
                   {"best": far, "losses": losses})]


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def all_notices(space: Mapping[str, TuneRange], chosen: Mapping[str, Any], trials: Sequence[Mapping],
                found: Mapping[str, Sequence[tuple[Any, float | None]]], groups: Mapping[str, str],
                accepts: Callable[[str, Any], bool] = lambda key, value: True) -> list[Notice]:
    """Every notice of a search; a flat key gets no edge notice (widening a range that does not matter
    gains nothing)."""
    flat = flat_notices(space, found)
    flat_keys = {notice.key for notice in flat}
    edges = [n for n in edge_notices(space, chosen, accepts) if n.key not in flat_keys]
    return edges + flat + disagreement_notices(space, trials, groups, chosen)
