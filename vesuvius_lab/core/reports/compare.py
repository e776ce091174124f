"""``vlab compare``: what differs between two runs, in their settings and in their scores per volume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rich.text import Text

from vesuvius_lab.core.reports.tables import ESSENTIAL, KEY, WRAP, Col, FittedTable
from vesuvius_lab.core.runs.folder import Run
from vesuvius_lab.core.runs.records import RunRecord, flatten, read_run

SCORE_KEYS = ("score", "topo_score", "surface_dice", "voi_score")
SUMMARY_KEYS = (*SCORE_KEYS, "voi_split", "voi_merge", "best_epoch", "epochs", "wall_time_s", "parameters")
ABSENT = object()


@dataclass(frozen=True)
class SpecChange:
    key: str
    old: Any  # ABSENT when only the second run has the key
    new: Any


@dataclass(frozen=True)
class VolumeScores:
    id: str
    a: dict | None  # the score components of the first run (None: not in its validation fold)
    b: dict | None


@dataclass(frozen=True)
class Comparison:
    a: RunRecord
    b: RunRecord
    spec_changes: list[SpecChange]
    volumes: list[VolumeScores]
    summary: list[tuple[str, Any, Any]]  # (key, value in a, value in b)
    components: list[tuple[str, str, str]]  # (model/loss/blend/postprocess, what a used, what b used)


def spec_changes(a: dict, b: dict) -> list[SpecChange]:
    """Every flattened key whose value differs (or that only one spec has), in the order of the specs."""
    flat_a, flat_b = flatten(a), flatten(b)
    changes = []
    for key in dict.fromkeys([*flat_a, *flat_b]):
        old, new = flat_a.get(key, ABSENT), flat_b.get(key, ABSENT)
        if _canonical(old) != _canonical(new):
            changes.append(SpecChange(key, old, new))
    return changes


def _canonical(value: Any) -> str:
    return "\0absent" if value is ABSENT else json.dumps(value, sort_keys=True, default=str)


def volume_scores(a: Run, b: Run) -> list[VolumeScores]:
    """Per-volume scores of both runs' best checkpoints, matched by volume id."""
    def by_id(run: Run) -> dict[str, dict]:
        scores = run.read("scores.json")
        volumes = scores.get("volumes") if isinstance(scores, dict) else None
        return {str(v["id"]): v for v in volumes or [] if isinstance(v, dict) and "id" in v}

    scores_a, scores_b = by_id(a), by_id(b)
    return [VolumeScores(volume_id, scores_a.get(volume_id), scores_b.get(volume_id))
            for volume_id in dict.fromkeys([*scores_a, *scores_b])]


def compare_runs(a: Run, b: Run) -> Comparison:
    record_a, record_b = read_run(a), read_run(b)
    summary = [(key, record_a.summary.get(key), record_b.summary.get(key)) for key in SUMMARY_KEYS]
    steps = dict.fromkeys([*record_a.summary.get("steps", {}), *record_b.summary.get("steps", {})])
    summary += [(f"after {step}", record_a.summary.get("steps", {}).get(step),
                 record_b.summary.get("steps", {}).get(step)) for step in steps]
    components = [(key, record_a.plugins[key], record_b.plugins[key]) for key in record_a.plugins]
    return Comparison(record_a, record_b, spec_changes(record_a.spec, record_b.spec), volume_scores(a, b), summary,
                      components)


#: The spec keys a component replaces when a run's summary names what it used instead (a backend's own loss).
SPEC_KEYS_OF = {"loss": "loss.", "blend": "inference.blend."}


def unused(key: str, record: RunRecord) -> bool:
    """Whether the run never used spec ``key``: its backend put its own component in that place."""
    components = record.summary.get("components")
    return isinstance(components, dict) and any(
        key.startswith(SPEC_KEYS_OF[name]) for name in components if name in SPEC_KEYS_OF)


# --------------------------------------------------------------------------- rich tables


def _value(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _delta(a: Any, b: Any, *, lower_is_better: bool = False) -> Text:
    """``b - a``, green when B is better, red when worse."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        return Text("—", style="dim")
    delta = b - a
    better = delta < 0 if lower_is_better else delta > 0
    style = "dim" if delta == 0 else "green" if better else "red"
    return Text(f"{delta:+.4f}" if isinstance(delta, float) else f"{delta:+d}", style=style)


def legend(comparison: Comparison) -> Text:
    """Which run is A and which is B: the tables' headers say only A and B."""
    a, b = comparison.a, comparison.b
    return Text.assemble(("A", "bold red"), f" {a.experiment}/{a.run.id}\n", ("B", "bold green"),
                         f" {b.experiment}/{b.run.id}", no_wrap=True, overflow="ignore")


def tables(comparison: Comparison, *, wide: bool = False) -> list[FittedTable]:
    """Summary numbers, the spec diff and the per-volume score differences, fitted to the page (``wide``:
    each one table with every value whole)."""
    a, b = comparison.a, comparison.b
    summary = FittedTable([Col("", KEY), Col("A", ESSENTIAL, "right"), Col("B", ESSENTIAL, "right"),
                           Col("B - A", ESSENTIAL, "right")], title="Scores (best checkpoint)", wide=wide)
    for key, value_a, value_b in comparison.summary:
        if value_a is None and value_b is None:
            continue
        lower_is_better = key in ("voi_split", "voi_merge", "wall_time_s", "parameters")
        summary.add_row(key, _value(value_a), _value(value_b), _delta(value_a, value_b, lower_is_better=lower_is_better))
    components = FittedTable([Col("", KEY), Col("A", WRAP), Col("B", WRAP)], title="What each run used", wide=wide)
    for key, used_a, used_b in comparison.components:
        components.add_row(key, used_a, used_b, style=None if used_a == used_b else "bold")
    spec = FittedTable([Col("key", KEY), Col("A", WRAP), Col("B", WRAP)],
                       title=f"Settings: {len(comparison.spec_changes)} key(s) differ",
                       caption="(not used): the run's backend used its own component instead.", wide=wide)
    for change in comparison.spec_changes:
        spec.add_row(change.key, _setting(change.old, unused(change.key, a), "red"),
                     _setting(change.new, unused(change.key, b), "green"))
    volumes = FittedTable([Col("volume", KEY), *(Col(header, ESSENTIAL, "right") for header in (
        "score A", "score B", "Δ score", "Δ TopoScore", "Δ SurfaceDice", "Δ VOI"))],
        title=f"Per volume ({len(comparison.volumes)} volume(s), from scores.json; Δ = B - A)", wide=wide)
    for volume in comparison.volumes:
        va, vb = volume.a or {}, volume.b or {}
        volumes.add_row(volume.id, _value(va.get("score", "—")), _value(vb.get("score", "—")),
                        _delta(va.get("score"), vb.get("score")),
                        *(_delta(va.get(k), vb.get(k)) for k in SCORE_KEYS[1:]))
    return [summary, components, spec, volumes]


def _setting(value: Any, not_used: bool, style: str) -> Text:
    if not_used and value is not ABSENT:
        return Text(f"{_value(value)} (not used)", style="dim")
    return Text(_value(value), style=style)
