"""The consoles every module prints through: results to stdout, progress and messages to stderr."""

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
