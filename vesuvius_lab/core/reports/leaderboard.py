"""The leaderboard: every run under a runs directory, its folds aggregated, ranked and explained.

Nothing here prints; :mod:`vesuvius_lab.core.reports.leaderboard_view` renders a :class:`Leaderboard` as
a rich table, Markdown, CSV, JSON or HTML. Reading is tolerant: a record that is missing, being
written or damaged reads as empty, and a run that cannot be ranked (failed, killed, still
running, no score) is listed as a :class:`Notice` below the table, never silently dropped.

Aggregation: one row per experiment name. Of several finished runs of the same fold, the newest
counts (the others are noted as superseded). Scores are the mean over folds with the sample
standard deviation and ``n``. Rank and the delta are computed over the rows that pass the filters.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.registry import suggest
from vesuvius_lab.core.reports.row_filter import MISSING, RowFilter, as_number, as_text, parse_filter
from vesuvius_lab.core.runs.records import RunRecord, comparable_spec, differing_keys, flatten, read_runs


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    better: str | None = None  # "high" or "low": the best value is highlighted
    per_run_only: bool = False
    aggregated_only: bool = False


COLUMNS = (
    Column("rank", "#"),
    Column("experiment", "experiment"),
    Column("fold", "fold", per_run_only=True),
    Column("run", "run", per_run_only=True),
    Column("model", "model"),
    Column("loss", "loss"),
    Column("blend", "blend"),
    Column("postprocess", "postprocess"),
    Column("score", "score", "high"),
    Column("topo_score", "TopoScore", "high"),
    Column("surface_dice", "SurfaceDice", "high"),
    Column("voi_score", "VOI", "high"),
    Column("delta", "Δ score"),
    Column("folds", "folds", aggregated_only=True),
    Column("epochs", "epochs"),
    Column("wall_time", "wall time", "low"),
    Column("parameters", "params", "low"),
    Column("commit", "git"),
)
METRICS = ("score", "topo_score", "surface_dice", "voi_score")
NUMBERS = {**{m: m for m in METRICS}, "epochs": "epochs", "wall_time": "wall_time_s", "parameters": "parameters",
           "best_epoch": "best_epoch"}
ALIASES = {"topo": "topo_score", "toposcore": "topo_score", "dice": "surface_dice", "surfacedice": "surface_dice",
           "voi": "voi_score", "wall": "wall_time", "time": "wall_time", "params": "parameters", "git": "commit",
           "name": "experiment", "n": "folds", "post": "postprocess", "postprocessing": "postprocess", "Δ": "delta"}


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Stat:
    """A number over the folds of a row: mean, sample standard deviation (None for n = 1), n."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Stat | None":
        numbers = [v for v in values if v is not None]
        if not numbers:
            return None
        return cls(statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else None, len(numbers))


@dataclass
class Row:
    """One leaderboard line: an experiment (its folds aggregated) or, with ``per_run``, one run."""

    experiment: str
    records: list[RunRecord]
    stats: dict[str, Stat]
    plugins: dict[str, str]
    spec: dict[str, Any]  # flattened spec of the first record (all keys, for filters)
    folds_total: int | None
    rank: int | None = None
    delta: float | None = None

    @property
    def folds(self) -> list[int]:
        return sorted({r.fold for r in self.records if r.fold is not None})

    @property
    def marker(self) -> str:
        """How the row's score was made when it is not a trained run's: "tuned, cross-validated", say."""
        summary = self.records[0].summary
        if summary.get("kind") != "tuned":
            return ""
        return f"tuned, {summary.get('estimate', 'in-sample')}"

    @property
    def commits(self) -> list[str]:
        return list(dict.fromkeys(r.commit for r in self.records if r.commit))

    def value(self, key: str) -> Any:
        """The row's value at a column key or a dotted spec key (numbers: the mean), or MISSING."""
        if key in self.stats:
            return self.stats[key].mean
        if key in NUMBERS:
            return MISSING
        if key in self.plugins:
            return self.plugins[key]
        simple = {
            "experiment": self.experiment, "rank": self.rank, "delta": self.delta,
            "run": ", ".join(r.run.id for r in self.records),
            "fold": self.folds[0] if len(self.folds) == 1 else self.folds,
            "folds": len(self.records),
            "commit": ", ".join(self.commits) or None,
        }
        if key in simple:
            return MISSING if simple[key] is None else simple[key]
        return self.spec.get(key, MISSING)


def _row(experiment: str, records: list[RunRecord]) -> Row:
    stats = {key: stat for key, summary_key in NUMBERS.items()
             if (stat := Stat.of(r.number(summary_key) for r in records)) is not None}
    first = records[0]
    folds = [r.folds for r in records if r.folds]
    return Row(experiment, records, stats, first.plugins, flatten(first.spec),
               max(folds) if folds else None)


# --------------------------------------------------------------------------- notices


@dataclass(frozen=True)
class Notice:
    """A run or an experiment the table cannot show as it is: why, and where to look."""

    kind: str  # killed, failed, running, interrupted, unfinished, no score, not validated, missing folds, superseded, ...
    experiment: str
    message: str
    run: str | None = None
    path: Path | None = None


def _run_notice(record: RunRecord) -> Notice:
    status, state = record.status, record.state
    epoch = status.get("epoch")
    train = record.spec.get("train")
    total = train.get("epochs") if isinstance(train, dict) else None
    progress = f" at epoch {epoch}/{total}" if isinstance(epoch, int) and epoch and total else ""
    fold = f"fold {record.fold}" if record.fold is not None else "fold ?"
    messages = {
        "killed": f"{fold}: killed{progress} (its process {status.get('pid')} is gone); "
                  f"continue it with `vlab train --resume {record.run.path}`",
        "failed": f"{fold}: failed{progress}: {status.get('error', 'no error recorded')}",
        "running": f"{fold}: still running{progress}",
        "interrupted": f"{fold}: interrupted{progress}; continue it with `vlab train --resume {record.run.path}`",
        "finished": f"{fold}: finished without a validation score (empty validation fold, or an unreadable "
                    "summary.json)",
    }
    kind = state if state in messages else "unfinished"
    if kind == "finished" and record.all_data:
        return Notice("not validated", record.experiment,
                      "fold all: trained on every volume, so not validated; it predicts test volumes "
                      "(`vlab predict`, `vlab submit`) and an ensemble's test volumes", record.run.id, record.run.path)
    if kind == "finished":
        kind = "no score"
    message = messages.get(state, f"{fold}: state {state!r}{progress} (no readable status.json)")
    return Notice(kind, record.experiment, message, record.run.id, record.run.path)


def _fold_notices(experiment: str, records: list[RunRecord], all_records: list[RunRecord]) -> list[Notice]:
    notices = []
    total = max((r.folds for r in records if r.folds), default=None)
    have = {r.fold for r in records}
    if total:
        missing = [k for k in range(total) if k not in have]
        if missing:
            others = {r.fold: r.state for r in all_records if r.experiment == experiment and r.fold in missing}
            detail = ", ".join(f"{k} ({others[k]})" if k in others else str(k) for k in missing)
            notices.append(Notice("missing folds", experiment,
                                  f"{len(have)} of {total} folds finished; no finished run for fold(s) {detail}. "
                                  f"The row is the mean over {len(have)} fold(s)."))
    return notices


def _newest_per_fold(experiment: str, records: list[RunRecord]) -> tuple[list[RunRecord], list[Notice]]:
    by_fold: dict[Any, list[RunRecord]] = {}
    for record in records:
        by_fold.setdefault(record.fold, []).append(record)
    chosen, older = [], []
    for fold in sorted(by_fold, key=lambda f: (f is None, f)):
        runs = sorted(by_fold[fold], key=lambda r: (r.started, r.run.id))
        chosen.append(runs[-1])
        older.extend(runs[:-1])
    notices = []
    if older:
        notices.append(Notice("superseded", experiment, f"{len(older)} older finished run(s) "
                              f"({', '.join(r.run.id for r in older)}) are left out of the mean: the newest run "
                              "of each fold counts. `--runs` lists every run."))
    specs = [comparable_spec(r.spec) for r in chosen]
    keys = differing_keys(specs)
    if keys:
        notices.append(Notice("mixed settings", experiment, f"its folds ran with different settings "
                              f"({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}); the row shows those of "
                              f"{chosen[0].run.id}."))
    return chosen, notices


# --------------------------------------------------------------------------- the leaderboard


@dataclass
class Leaderboard:
    runs_dir: Path
    per_run: bool
    rows: list[Row]
    spec_keys: list[str]  # config keys that differ between the rows shown
    notices: list[Notice]
    baseline: str | None = None
    sort: str = "score"
    filters: list[RowFilter] = field(default_factory=list)
    hidden_rows: int = 0  # ranked rows left out by --top

    @property
    def columns(self) -> list[Column]:
        return [c for c in COLUMNS if not (c.per_run_only and not self.per_run)
                and not (c.aggregated_only and self.per_run)]

    def best(self, key: str) -> float | None:
        """The best value of a highlighted column among the rows shown (None when all are equal)."""
        column = next((c for c in COLUMNS if c.key == key), None)
        values = [v for row in self.rows if (v := as_number(row.value(key))) is not None] \
            if column and column.better else []
        if len(set(values)) < 2:
            return None
        return max(values) if column.better == "high" else min(values)


def column_key(key: str, rows: list[Row]) -> str:
    """A column key, an alias, or a dotted spec key present in some row; otherwise a UserError."""
    lowered = key.lower()
    if any(c.key == lowered for c in COLUMNS) or lowered in NUMBERS:
        return lowered
    if lowered in ALIASES:
        return ALIASES[lowered]
    if any(key in row.spec for row in rows):
        return key
    known = [c.key for c in COLUMNS] + list(ALIASES)
    spec_keys = sorted({k for row in rows for k in row.spec})
    raise UserError(f"Unknown leaderboard key {key!r}.{suggest(key, known + spec_keys)} Use a column "
                    f"({', '.join(c.key for c in COLUMNS)}) or a dotted spec key such as "
                    f"{', '.join(spec_keys[:3]) or 'train.lr'}.")


def _task(record: RunRecord) -> str:
    data = record.spec.get("data") if isinstance(record.spec, dict) else None
    return (data or {}).get("task", "segmentation") if isinstance(data, dict) else "segmentation"


def build_leaderboard(runs_dir: Path, *, per_run: bool = False, sort: str | None = None,
                      filters: Iterable[str] = (), top: int | None = None, baseline: str | None = None,
                      experiments: Iterable[str] | None = None, task: str = "segmentation") -> Leaderboard:
    """Read every run under ``runs_dir`` (or only those of ``experiments``) of one ``[data] task`` and rank
    them, with notices (runs of other tasks are named, not ranked: their scores are not comparable)."""
    if not Path(runs_dir).is_dir():
        raise UserError(f"{runs_dir}: no such runs folder. Give the folder holding <experiment>/<run-id>/ "
                        "(default: runs_dir of vesuvius.toml, or `vlab --runs DIR`).")
    records = read_runs(runs_dir)
    if experiments is not None:
        wanted = set(experiments)
        records = [r for r in records if r.experiment in wanted]
    other_task = sorted({(r.experiment, _task(r)) for r in records if _task(r) != task})
    records = [r for r in records if _task(r) == task]
    notices = [_run_notice(r) for r in records if not r.ranked]
    notices += [Notice("other task", name, f"a {kind} run, ranked by `vlab leaderboard --task {kind}`")
                for name, kind in other_task]
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.ranked:
            groups.setdefault(record.experiment, []).append(record)
    rows = []
    for experiment, group in groups.items():
        chosen, group_notices = _newest_per_fold(experiment, group)
        notices.extend(_fold_notices(experiment, chosen, records))
        if per_run:
            rows.extend(_row(experiment, [r]) for r in sorted(group, key=lambda r: (r.fold or 0, r.run.id)))
        else:
            notices.extend(group_notices)
            rows.append(_row(experiment, chosen))
    parsed = [parse_filter(text) for text in filters]
    for rule in parsed:
        key = column_key(rule.key, rows)
        rows = [row for row in rows if rule.matches(row.value(key))]
    _rank(rows)
    rows.sort(key=lambda row: row.rank)
    _set_deltas(rows, _baseline_score(baseline, rows, groups, per_run))
    sort_key = column_key(sort, rows) if sort else "score"
    rows = sort_rows(rows, sort_key)
    shown = rows[:top] if top is not None else rows
    comparable = [comparable_spec(row.records[0].spec) for row in shown]
    spec_keys = differing_keys(comparable) if len(shown) > 1 else []
    return Leaderboard(Path(runs_dir), per_run, shown, spec_keys, notices, baseline, sort_key, parsed,
                       len(rows) - len(shown))


def _rank(rows: list[Row]) -> None:
    """Competition ranking by score, best first: equal scores share a rank (1, 1, 3)."""
    ordered = sorted(rows, key=lambda r: -r.stats["score"].mean)
    for position, row in enumerate(ordered):
        previous = ordered[position - 1] if position else None
        same = previous is not None and math.isclose(previous.stats["score"].mean, row.stats["score"].mean,
                                                     rel_tol=0, abs_tol=1e-12)
        row.rank = previous.rank if same else position + 1


def _baseline_score(baseline: str | None, rows: list[Row], groups: dict[str, list[RunRecord]],
                    per_run: bool) -> float | None:
    if baseline is None:
        return max((row.stats["score"].mean for row in rows), default=None)
    if baseline in groups:
        chosen = _newest_per_fold(baseline, groups[baseline])[0]
        return statistics.fmean(r.score for r in chosen)
    for records in groups.values():
        for record in records:
            if record.run.id == baseline or str(record.run.path).endswith(baseline):
                return record.score
    raise UserError(f"--baseline {baseline!r}: no finished, scored experiment or run has that name."
                    f"{suggest(baseline, list(groups))} Experiments: {', '.join(sorted(groups)) or 'none'}.")


def _set_deltas(rows: list[Row], reference: float | None) -> None:
    for row in rows:
        row.delta = None if reference is None else row.stats["score"].mean - reference


def sort_rows(rows: list[Row], key: str) -> list[Row]:
    """Best first for scored columns (high or low is better), ascending otherwise; missing values last."""
    column = next((c for c in COLUMNS if c.key == key), None)
    better = column.better if column else None
    if key in ("rank", "delta"):
        key, better = "score", "high"
    present = [row for row in rows if row.value(key) is not MISSING]
    absent = [row for row in rows if row.value(key) is MISSING]
    numeric = all(as_number(row.value(key)) is not None and not isinstance(row.value(key), str) for row in present)
    if numeric:
        present.sort(key=lambda row: as_number(row.value(key)), reverse=better == "high")
    else:
        present.sort(key=lambda row: as_text(row.value(key)))
    return present + absent
