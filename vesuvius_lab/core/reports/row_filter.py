"""The ``--filter`` grammar of ``vlab leaderboard``: ``KEY OP VALUE``, several filters all apply.

KEY   a column (``score``, ``topo``, ``model``, ``experiment``, ``epochs``, ...) or any key of the
      resolved spec, dotted (``train.lr``, ``model.params.encoder``, ``loss.0.plugin``).
OP    ``=``  equal: numbers compare as numbers, text as a shell pattern (``model=smp_*``)
      ``!=`` not equal (same rules)
      ``>`` ``>=`` ``<`` ``<=``  numeric comparison; a row without a number there does not match
      ``~``  contains, case-insensitive (``postprocess~small``)

Examples: ``score>0.5``, ``model=smp_unet25d``, ``train.lr<=1e-3``, ``experiment!=*-debug``.
A row without the key matches only ``!=``. Aggregated rows compare the mean over folds.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any

from vesuvius_lab.core.errors import UserError

OPERATORS = (">=", "<=", "!=", "=", ">", "<", "~")
_FILTER = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|<=|!=|=|>|<|~)\s*(.*?)\s*$")
MISSING = object()


@dataclass(frozen=True)
class RowFilter:
    key: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"

    def matches(self, actual: Any) -> bool:
        """Whether a row whose value at ``key`` is ``actual`` (or :data:`MISSING`) passes."""
        if actual is MISSING or actual is None:
            return self.op == "!="
        if self.op in ("=", "!="):
            equal = _equal(actual, self.value)
            return equal if self.op == "=" else not equal
        if self.op == "~":
            return self.value.lower() in as_text(actual).lower()
        number, wanted = as_number(actual), as_number(self.value)
        if number is None or wanted is None:
            return False
        return {">": number > wanted, ">=": number >= wanted, "<": number < wanted, "<=": number <= wanted}[self.op]


def parse_filter(text: str) -> RowFilter:
    """``"score>0.5"`` -> RowFilter("score", ">", "0.5"), or a UserError explaining the grammar."""
    match = _FILTER.match(text)
    if not match or not match.group(3):
        raise UserError(f"--filter {text!r}: expected KEY OP VALUE with OP one of {' '.join(OPERATORS)}, "
                        "e.g. --filter score>0.5 or --filter model=smp_unet25d (see `vlab leaderboard --help`).")
    key, op, value = match.groups()
    if value[0] in "<>=!~":
        raise UserError(f"--filter {text!r}: the value starts with {value[0]!r}; the operators are "
                        f"{' '.join(OPERATORS)} (e.g. score>=0.5, not score=>0.5).")
    if op in (">", ">=", "<", "<=") and as_number(value) is None:
        raise UserError(f"--filter {text!r}: {op} compares numbers, and {value!r} is not one.")
    return RowFilter(key, op, value)


def as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def as_text(value: Any) -> str:
    """How a value is matched as text: lists as ``[a, b]``, booleans as ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(as_text(item) for item in value) + "]"
    return str(value)


def _equal(actual: Any, wanted: str) -> bool:
    number, target = as_number(actual), as_number(wanted)
    if number is not None and target is not None and not isinstance(actual, str):
        return math.isclose(number, target, rel_tol=1e-9, abs_tol=1e-12)
    return fnmatch.fnmatchcase(as_text(actual), wanted)
