"""The consoles every module prints through: results to stdout, progress and messages to stderr.

Output that is not a terminal (a log file, a pipe, CI) gets a page of 120 columns instead of rich's 80
(tables fit it: see ``core/reports/tables.py``); ``COLUMNS`` decides when it is set.
"""

import os
import sys

from rich.console import Console


def _width(stream) -> int | None:
    if "COLUMNS" in os.environ or stream.isatty():
        return None
    return 120


out = Console(soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))
