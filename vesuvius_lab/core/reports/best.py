"""Runs chosen by their place on the leaderboard: ``vlab submit best`` and ``vlab ensemble --top N``.

The choice is the leaderboard's own (segmentation runs, folds aggregated, ranked by score), so what
a user reads at the top of ``vlab leaderboard`` is what these commands take, and they print it.
"""

from __future__ import annotations

from pathlib import Path

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.reports.leaderboard import Row, build_leaderboard
from vesuvius_lab.core.runs.folder import Run

BEST = "best"
#: Run kinds that combine other runs: never members of a new ensemble.
COMBINED_KINDS = ("ensemble", "tuned")


def _ranked_rows(runs_dir: Path) -> list[Row]:
    return [row for row in build_leaderboard(runs_dir).rows if row.rank is not None]


def best_run(runs_dir: Path) -> tuple[Run, Row]:
    """The run of the leaderboard's first row (one run: a fold, an ensemble or a tuned chain)."""
    rows = _ranked_rows(runs_dir)
    if not rows:
        raise UserError(f"best: no scored run under {runs_dir}, so there is no best one. Train and score a run "
                        "first (`vlab run EXPERIMENT.toml`), or name a run folder or an experiment.")
    row = rows[0]
    if len(row.records) > 1:
        folds = ", ".join(str(f) for f in row.folds)
        raise UserError(f"best: the leaderboard's first row, {row.experiment}, averages {len(row.records)} fold runs "
                        f"(folds {folds}); a submission needs one model. Name one fold's run "
                        f"(`vlab leaderboard --runs` lists them), or combine its folds with `vlab ensemble` "
                        f'(members = [{{ experiment = "{row.experiment}", folds = "all" }}]) and submit that.')
    return row.records[0].run, row


def strongest_members(runs_dir: Path, count: int) -> list[dict]:
    """``[ensemble] members`` for the ``count`` best trained experiments of the leaderboard (ensembles and
    tuned chains left out), each with the folds it has."""
    rows = [row for row in _ranked_rows(runs_dir)
            if not any(r.summary.get("kind") in COMBINED_KINDS for r in row.records)]
    if len(rows) < count:
        names = ", ".join(row.experiment for row in rows) or "none"
        raise UserError(f"--top {count}: the leaderboard under {runs_dir} has {len(rows)} scored trained "
                        f"experiment(s) ({names}). Train more, or give a smaller --top.")
    return [_member(row) for row in rows[:count]]


def _member(row: Row) -> dict:
    folds = [r.fold for r in row.records]
    if all(isinstance(fold, int) for fold in folds):
        return {"experiment": row.experiment, "folds": sorted(folds)}
    return {"run": str(row.records[0].run.path)}  # a fold "all" run: that run itself
