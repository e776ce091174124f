"""The ``--summary FILE`` option of every benchmark: its results as a JSON list of rows.

A row is ``{"benchmark", "measure", "ours", "peer", "peer_name", "ratio", "unit", "target",
"note"}``; ``ratio`` is ours / peer unless the benchmark says otherwise. ``benchmarks/run_all.py``
collects the rows of every benchmark into one table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", metavar="FILE", help="also write the results as a JSON list of rows to FILE")


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def row(benchmark: str, measure: str, ours, unit: str, *, peer=None, peer_name: str | None = None,
        ratio=None, target: str | None = None, note: str | None = None) -> dict:
    """One result; ``ratio`` defaults to ours / peer when both are known."""
    ours, peer = _number(ours), _number(peer)
    if ratio is None and ours is not None and peer:
        ratio = ours / peer
    return {"benchmark": benchmark, "measure": measure, "ours": ours, "peer": peer, "peer_name": peer_name,
            "ratio": _number(ratio), "unit": unit, "target": target, "note": note}


def write(path: str | None, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")
