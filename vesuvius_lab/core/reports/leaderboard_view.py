"""Rendering a :class:`~vesuvius_lab.core.reports.leaderboard.Leaderboard`: rich table, Markdown, CSV, JSON, HTML.

Every format carries the same rows in the same order. The text formats (rich, Markdown, HTML)
show formatted cells with the best value of each scored column highlighted; CSV and JSON carry
raw numbers (means, standard deviations, n) for further processing.
"""

from __future__ import annotations

import csv
import html
import io
import json
from typing import Any

from rich.console import Console
from rich.text import Text

from vesuvius_lab.core.config.sweep import key_labels
from vesuvius_lab.core.reports.leaderboard import Column, Leaderboard, Notice, Row, Stat
from vesuvius_lab.core.reports.row_filter import MISSING, as_number
from vesuvius_lab.core.reports.tables import ESSENTIAL, KEY, OPTIONAL, WRAP, Col, FittedTable

DASH = "—"
NOTICE_STYLES = {"killed": "red", "failed": "red", "running": "yellow", "interrupted": "yellow",
                 "unfinished": "yellow", "no score": "yellow", "not validated": "cyan", "missing folds": "yellow",
                 "superseded": "dim", "mixed settings": "magenta"}


# --------------------------------------------------------------------------- cells


def format_number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def format_stat(stat: Stat | None, digits: int = 4) -> str:
    if stat is None:
        return DASH
    text = format_number(stat.mean, digits)
    return f"{text} ± {stat.std:.{digits}f}" if stat.std is not None else text


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_count(value: float) -> str:
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f}"


def format_spec_value(value: Any) -> str:
    if value is MISSING:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_spec_value(v) for v in value) + "]"
    if value is None:
        return "none"
    return str(value)


def cell(board: Leaderboard, row: Row, key: str) -> str:
    """The formatted text of one cell."""
    if key in ("score", "topo_score", "surface_dice", "voi_score"):
        return format_stat(row.stats.get(key))
    if key == "delta":
        if row.delta is None:
            return DASH
        if board.baseline is None and row.rank == 1:
            return "best"
        return "0" if abs(row.delta) < 5e-5 else f"{row.delta:+.4f}"
    if key == "rank":
        return str(row.rank)
    if key == "folds":
        return f"{len(row.records)}/{row.folds_total}" if row.folds_total else str(len(row.records))
    if key == "fold":
        return ", ".join(map(str, row.folds)) or "?"
    if key == "epochs":
        stat = row.stats.get("epochs")
        if stat is None:
            return DASH
        low, high = min(r.number("epochs") or 0 for r in row.records), max(r.number("epochs") or 0 for r in row.records)
        return f"{low:.0f}" if low == high else f"{low:.0f}–{high:.0f}"
    if key == "wall_time":
        stat = row.stats.get("wall_time")
        return DASH if stat is None else format_duration(stat.mean) + (" /fold" if len(row.records) > 1 else "")
    if key == "parameters":
        stat = row.stats.get("parameters")
        return DASH if stat is None else format_count(stat.mean)
    if key == "commit":
        return ", ".join(row.commits) or DASH
    if key == "experiment":
        return f"{row.experiment} ({row.marker})" if row.marker else row.experiment
    return format_spec_value(row.value(key))


def is_best(board: Leaderboard, row: Row, column: Column) -> bool:
    best = board.best(column.key) if column.better else None
    value = as_number(row.value(column.key)) if best is not None else None
    return value is not None and abs(value - best) <= 1e-12 * max(1.0, abs(best)) and len(board.rows) > 1


def headers(board: Leaderboard) -> list[str]:
    return [c.title for c in board.columns] + board.spec_keys


def text_rows(board: Leaderboard) -> list[list[tuple[str, bool]]]:
    """Formatted cells of every row as (text, is the best of its column)."""
    return [[(cell(board, row, c.key), is_best(board, row, c)) for c in board.columns]
            + [(cell(board, row, key), False) for key in board.spec_keys]
            for row in board.rows]


def notice_lines(board: Leaderboard) -> list[tuple[Notice, str]]:
    """Each notice as one line of text, ``experiment/run: message``."""
    lines = []
    for notice in board.notices:
        who = f"{notice.experiment}/{notice.run}" if notice.run else notice.experiment
        lines.append((notice, f"{who}: {notice.message}"))
    return lines


def title(board: Leaderboard) -> str:
    what = "runs" if board.per_run else "experiments, folds aggregated (mean ± std)"
    parts = [f"Leaderboard of {board.runs_dir}: {len(board.rows)} {what}"]
    if board.baseline:
        parts.append(f"Δ to {board.baseline}")
    if board.filters:
        parts.append("filter " + " and ".join(map(str, board.filters)))
    if board.sort != "score":
        parts.append(f"sorted by {board.sort}")
    if board.hidden_rows:
        parts.append(f"{board.hidden_rows} more below --top")
    return "; ".join(parts)


# --------------------------------------------------------------------------- rich


#: Text columns that move into the caption of the rich table when every row has the same value.
COLLAPSIBLE = ("model", "loss", "blend", "postprocess", "commit")


#: Differing settings shown as terminal columns; the rest are named in the caption (--wide and exports keep all).
MAX_TERMINAL_SPEC_COLUMNS = 4

#: What identifies a row (repeated on every table; ``fold`` only in ``--runs``) and what is always shown
#: whole; the rest may move. Rows keep their order in every table.
KEY_COLUMNS = ("rank", "experiment", "fold")
ESSENTIAL_COLUMNS = ("score", "topo_score", "surface_dice", "voi_score", "folds")
NUMERIC_COLUMNS = {"rank", "score", "topo_score", "surface_dice", "voi_score", "delta", "folds", "epochs",
                   "wall_time", "parameters"}


def rich_table(board: Leaderboard, *, wide: bool = False) -> FittedTable:
    """The terminal view, fitted to the page (see :mod:`vesuvius_lab.core.reports.tables`): rank and
    experiment head every table; scores (mean ± std) and folds are never shortened and come first;
    the settings are whole where they fit, else on a table below (ellipsized only when wider than a
    table of their own). Columns equal in every row go to the caption. ``wide``: one table, every
    differing setting, nothing shortened."""
    rows = text_rows(board)
    keys = [c.key for c in board.columns] + board.spec_keys
    constant = {key for position, key in enumerate(keys) if key in COLLAPSIBLE and len(rows) > 1
                and len({cells[position][0] for cells in rows}) == 1}
    titles = {c.key: c.title for c in board.columns}
    caption = " · ".join(f"{titles[key]} {rows[0][keys.index(key)][0]}" for key in COLLAPSIBLE
                         if key in constant and rows[0][keys.index(key)][0] != DASH)
    limit = len(board.spec_keys) if wide else MAX_TERMINAL_SPEC_COLUMNS
    hidden = board.spec_keys[limit:]
    captions = [f"same in every row: {caption}"] if caption else []
    if hidden:
        captions.append(f"{len(hidden)} more differing settings not shown here ({', '.join(hidden[:6])}"
                        f"{', ...' if len(hidden) > 6 else ''}): see --wide, --md, --csv, --json or vlab compare")
    shown = [key for key in keys if key not in constant and key not in hidden]
    labels = key_labels(board.spec_keys)
    marked = any(row.marker for row in board.rows)
    columns = []
    for key in shown:
        title_of = titles.get(key, labels.get(key, key))
        role = KEY if key in KEY_COLUMNS else ESSENTIAL if key in ESSENTIAL_COLUMNS else OPTIONAL
        columns.append(Col(title_of, role, "right" if key in NUMERIC_COLUMNS else "left",
                           header_style=None if key in titles else "bold cyan"))
        if key == "experiment" and marked:  # how a tuned row was scored, read as part of its name
            columns.append(Col("", OPTIONAL))
    table = FittedTable(columns, title=title(board), caption="\n".join(captions) or None, wide=wide)
    for row, cells in zip(board.rows, rows):
        texts = []
        for key, (text, best) in zip(keys, cells):
            if key == "experiment":
                texts.append(Text(row.experiment))
                if marked:
                    texts.append(Text(f"({row.marker})" if row.marker else ""))
            elif key in shown:
                texts.append(_rich_cell(text, best))
        table.add_row(*texts, style="bold" if row.rank == 1 and len(board.rows) > 1 else None)
    return table


def _rich_cell(text: str, best: bool) -> Text:
    """A cell, its mean highlighted when it is the best of its column, its standard deviation dim."""
    mean, sep, std = text.partition(" ± ")
    cell = Text(mean, style="bold green" if best else "")
    if sep:
        cell.append(f" ± {std}", style="dim")
    return cell


def rich_notices(board: Leaderboard) -> FittedTable:
    """Below the table: runs that are not ranked and warnings, one per row, wrapped between words."""
    table = FittedTable([Col("kind", KEY, "right"), Col("notice", WRAP)], show_header=False)
    for notice, text in notice_lines(board):
        style = NOTICE_STYLES.get(notice.kind, "yellow")
        table.add_row(Text(notice.kind, style=f"bold {style}"), Text(text, style=style if style == "dim" else ""))
    return table


# --------------------------------------------------------------------------- markdown, html


def markdown(board: Leaderboard) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"**{escape(title(board))}**", "", "| " + " | ".join(map(escape, headers(board))) + " |",
             "|" + "|".join("---:" if c.better or c.key in ("rank", "delta") else "---" for c in board.columns)
             + "|" * bool(board.spec_keys) + "|".join("---" for _ in board.spec_keys) + "|"]
    for cells in text_rows(board):
        lines.append("| " + " | ".join(f"**{escape(t)}**" if best else escape(t) for t, best in cells) + " |")
    if board.notices:
        lines += ["", "Not ranked and warnings:", ""]
        lines += [f"- **{notice.kind}** {escape(text)}" for notice, text in notice_lines(board)]
    return "\n".join(lines) + "\n"


HTML_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
th.spec { color: #056; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; color: #0a6b2d; background: #e8f6ec; }
tr.first td { border-bottom: 2px solid #888; }
li.killed, li.failed { color: #a40000; } li.superseded { color: #777; }
"""


def html_page(board: Leaderboard) -> str:
    e = html.escape
    numeric = {c.key for c in board.columns if c.better} | {"rank", "delta", "folds", "epochs"}
    head = "".join(f"<th>{e(c.title)}</th>" for c in board.columns) + \
        "".join(f'<th class="spec">{e(k)}</th>' for k in board.spec_keys)
    body = []
    for row, cells in zip(board.rows, text_rows(board)):
        keys = [c.key for c in board.columns] + board.spec_keys
        tds = "".join(f'<td class="{" ".join(cls for cls in ("num" if key in numeric else "", "best" if best else "") if cls)}">'
                      f"{e(text)}</td>" for key, (text, best) in zip(keys, cells))
        body.append(f'<tr class="{"first" if row.rank == 1 else ""}">{tds}</tr>')
    notices = "".join(f'<li class="{e(n.kind.replace(" ", "-"))}"><b>{e(n.kind)}</b> {e(text)}</li>'
                      for n, text in notice_lines(board))
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>vesuvius-lab leaderboard</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n<h1>Leaderboard</h1>\n<p>{e(title(board))}</p>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
            + (f"<h2>Not ranked and warnings</h2><ul>{notices}</ul>\n" if notices else "") + "</body></html>\n")


# --------------------------------------------------------------------------- csv, json


def _stat_fields(key: str, stat: Stat | None) -> dict[str, Any]:
    return {key: stat.mean if stat else None, f"{key}_std": stat.std if stat else None}


def records(board: Leaderboard) -> list[dict[str, Any]]:
    """The rows as plain dicts of raw values (numbers unformatted), for CSV and JSON."""
    out = []
    for row in board.rows:
        record: dict[str, Any] = {"rank": row.rank, "experiment": row.experiment}
        if board.per_run:
            record.update(fold=row.folds[0] if row.folds else None, run=row.records[0].run.id)
        record.update(row.plugins)
        for key in ("score", "topo_score", "surface_dice", "voi_score"):
            record.update(_stat_fields(key, row.stats.get(key)))
        record["delta"] = row.delta
        if not board.per_run:
            record.update(n=len(row.records), folds_total=row.folds_total, folds=row.folds)
        for key in ("epochs", "wall_time", "parameters"):
            stat = row.stats.get(key)
            record[key if key != "wall_time" else "wall_time_s"] = stat.mean if stat else None
        record["commit"] = ", ".join(row.commits) or None
        record["runs"] = [str(r.run.path) for r in row.records]
        for key in board.spec_keys:
            value = row.value(key)
            record[key] = None if value is MISSING else value
        out.append(record)
    return out


def to_json(board: Leaderboard) -> str:
    document = {
        "runs_dir": str(board.runs_dir), "per_run": board.per_run, "sort": board.sort,
        "filters": [str(f) for f in board.filters], "baseline": board.baseline, "spec_keys": board.spec_keys,
        "rows": records(board),
        "notices": [{"kind": n.kind, "experiment": n.experiment, "run": n.run, "message": n.message,
                     "path": str(n.path) if n.path else None} for n in board.notices],
    }
    return json.dumps(document, indent=2, default=str) + "\n"


def to_csv(board: Leaderboard) -> str:
    rows = records(board)
    buffer = io.StringIO()
    fields = list(rows[0]) if rows else ["rank", "experiment", "score"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)
                         for k, v in record.items()})
    return buffer.getvalue()


# --------------------------------------------------------------------------- printing


def print_leaderboard(board: Leaderboard, out: Console, err: Console, fmt: str | None = None, *,
                      wide: bool = False) -> None:
    """Print in ``fmt`` ("md", "csv", "json"; None: a rich table fitted to ``out``'s width, or with
    ``wide`` one table with every value whole) to ``out``; CSV's warnings go to ``err``."""
    if fmt == "json":
        out.out(to_json(board), end="", highlight=False)
        return
    if fmt == "md":
        out.out(markdown(board), end="", highlight=False)
        return
    if fmt == "csv":
        out.out(to_csv(board), end="", highlight=False)
        for _, text in notice_lines(board):
            err.print(f"warning: {text}", highlight=False, markup=False)
        return
    if board.rows:
        out.print(rich_table(board, wide=wide), crop=False)
    else:
        out.print(f"No ranked runs under {board.runs_dir}"
                  + (" pass the filters." if board.filters else " yet: train one with `vlab train EXPERIMENT`."),
                  highlight=False, markup=False)
    if board.notices:
        out.print(rich_notices(board), crop=False)
