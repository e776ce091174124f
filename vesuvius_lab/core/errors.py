"""Errors a user can cause. The CLI prints their message (no traceback) and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: a file, a setting, a name. The message says what to do."""

    exit_code = 2
