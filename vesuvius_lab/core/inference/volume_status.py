"""``vlab predict --status OUT.zarr``: how far a block-wise prediction is, from its records alone.

Reads ``OUT.zarr/.vlab`` (the plan of the last command that opened the output, one record per done
or failed block, the submissions of job arrays) and the output's attributes; opens neither the run
nor the input, so it answers at once, from any machine that sees the output folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.block_records import BlockRecords
from vesuvius_lab.core.inference.blocks import BlockPlan, Box


@dataclass
class VolumeStatus:
    output: Path
    blocks: int
    predicted: int = 0
    empty: int = 0  # done without running the model: no scroll in them
    failed: dict[str, dict] = field(default_factory=dict)  # block name -> its failure record
    left: list[str] = field(default_factory=list)  # neither done nor failed
    complete: bool = False  # every block done, the global pass and the pyramid built
    submissions: list[dict] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.predicted + self.empty


def volume_status(output: Path) -> VolumeStatus:
    records = BlockRecords(output)
    record = records.read_plan()
    if record is None or not isinstance(record.get("plan"), dict):
        raise UserError(f"{output}: not an output of `vlab predict` (no readable {records.root.name}/"
                        f"{records.plan_file.name} with a block plan). Give the OUT.zarr folder a block-wise "
                        "prediction writes.")
    try:
        saved = record["plan"]
        plan = BlockPlan(tuple(saved["volume_shape"]), Box.from_json(saved["region"]), tuple(saved["block"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{records.plan_file}: its block plan cannot be read ({exc}). Start the prediction again "
                        "with --force.") from None
    status = VolumeStatus(Path(output), len(plan), failed=records.failed())
    for block in plan.blocks():
        done = records.done(block)
        if done is not None:
            if done.get("predicted", True):
                status.predicted += 1
            else:
                status.empty += 1
            status.failed.pop(block.name, None)
        elif block.name not in status.failed:
            status.left.append(block.name)
    status.complete = _complete(Path(output))
    try:
        status.submissions = json.loads((records.root / "submissions.json").read_text())
    except (OSError, ValueError):
        status.submissions = []
    return status


def _complete(output: Path) -> bool:
    for name in (".zattrs", "zarr.json"):
        try:
            attrs = json.loads((output / name).read_text())
        except (OSError, ValueError):
            continue
        attrs = attrs.get("attributes", attrs)
        return bool((attrs.get("vesuvius_lab") or {}).get("complete"))
    return False
