"""The records of a block-wise prediction: its plan and fingerprint, and one record per finished block.

They live in the output itself, under ``OUT.zarr/.vlab/`` (zarr readers ignore the folder):

``plan.json``
    the fingerprint (what must be the same for a rerun to continue: run, checkpoints, inference
    settings, chain, input, output layout) with what it was made from, the block plan and the
    output's options;
``done/<z>_<y>_<x>.json``
    written atomically after the block's chunks are written: the box it wrote, whether the model ran
    or the block held no scroll, its time, host and process;
``failed/<z>_<y>_<x>.json``
    a block that raised: the error and the log that has its traceback (removed when it is done).

A block is recorded done only after its data is in the store, so a process killed at any moment
loses at most the blocks it was writing; any number of processes on any machines that share the
output folder can take blocks, since each block is written by one of them and recorded on its own.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from vesuvius_lab.core.files import write_text_atomic
from vesuvius_lab.core.inference.blocks import Block, Box

RECORDS = ".vlab"
PLAN_FILE = "plan.json"


class BlockRecords:
    """The ``.vlab`` folder of an output: its plan and the state of each block."""

    def __init__(self, output: Path):
        self.root = Path(output) / RECORDS

    @property
    def plan_file(self) -> Path:
        return self.root / PLAN_FILE

    def read_plan(self) -> dict | None:
        """The plan record, or None when there is none or it cannot be read as a JSON object."""
        try:
            record = json.loads(self.plan_file.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def write_plan(self, record: dict) -> None:
        write_text_atomic(self.plan_file, json.dumps(record, indent=2) + "\n")

    def _file(self, kind: str, block: Block) -> Path:
        return self.root / kind / f"{block.name}.json"

    def done(self, block: Block) -> dict | None:
        """The done record of ``block`` if it covers the block's core, else None."""
        try:
            record = json.loads(self._file("done", block).read_text())
            written = Box.from_json(record["core"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None  # missing, or half-written by a file system without atomic renames: redo the block
        return record if written.contains(block.core) else None

    def mark_done(self, block: Block, *, predicted: bool, seconds: float) -> None:
        record = {"core": block.core.to_json(), "predicted": predicted, "seconds": round(seconds, 3),
                  "host": socket.gethostname(), "pid": os.getpid(), "finished_unix": time.time()}
        write_text_atomic(self._file("done", block), json.dumps(record) + "\n")
        self._file("failed", block).unlink(missing_ok=True)

    def mark_failed(self, block: Block, error: str, log: Path | None = None) -> None:
        record = {"core": block.core.to_json(), "error": error, "log": str(log) if log else None,
                  "host": socket.gethostname(), "pid": os.getpid(), "failed_unix": time.time()}
        write_text_atomic(self._file("failed", block), json.dumps(record) + "\n")

    def failed(self) -> dict[str, dict[str, Any]]:
        """Block name -> failure record, for every block that failed and is not done since."""
        found = {}
        for path in sorted((self.root / "failed").glob("*.json")):
            try:
                found[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                found[path.stem] = {"error": "unreadable failure record"}
        return found

    def done_names(self) -> set[str]:
        return {path.stem for path in (self.root / "done").glob("*.json")}

    def clear_done(self) -> None:
        for kind in ("done", "failed"):
            for path in (self.root / kind).glob("*.json"):
                path.unlink(missing_ok=True)
