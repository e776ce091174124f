"""The consoles every module prints through: results to stdout, progress and messages to stderr.

Output that is not a terminal (a log file, CI) gets a wide page instead of rich's 80 columns, so
tables keep their columns; ``COLUMNS`` still decides when it is set.
"""

import os
import sys

from rich.console import Console


def _width(stream) -> int | None:
    if "COLUMNS" in os.environ or stream.isatty():
        return None
    return 240


out = Console(soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))
