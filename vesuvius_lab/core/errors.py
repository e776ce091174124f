"""Errors a user can cause. The CLI prints their message (no traceback) and exits with status 2.

:func:`os_error_message` is the one place where an ``OSError`` (a read-only folder, a full disk,
a path whose parent is a file, a symlink loop, ...) becomes a message that names the path, what
failed and what to do; the CLI uses it for every OSError that reaches it.
"""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """A problem with the user's input: a file, a setting, a name. The message says what to do."""

    exit_code = 2


def brief(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when the message is empty), cut to ``limit``."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 1] + "…"


#: errno -> (what it means, what to do)
_OS_ERRORS = {
    errno.EACCES: ("permission denied", "Check the permissions of the path and its folders, or choose another "
                                        "location (--runs, --output, or the paths in vesuvius.toml)."),
    errno.EPERM: ("operation not permitted", "Check the permissions of the path and its folders, or choose another "
                                             "location."),
    errno.EROFS: ("the file system is read-only", "Choose a writable location (--runs, --output, or the paths in "
                                                   "vesuvius.toml)."),
    errno.ENOSPC: ("no space left on the device", "Free some space (or point --runs / --output elsewhere) and run "
                                                  "the command again."),
    errno.EDQUOT: ("the disk quota is exceeded", "Free some space (or point --runs / --output elsewhere) and run "
                                                 "the command again."),
    errno.EFBIG: ("the file is larger than this system allows (a file-size limit, e.g. `ulimit -f`)",
                  "Raise the limit or write to a file system that takes large files, then run the command again."),
    errno.ENOTDIR: ("a part of the path that should be a folder is a file", "Check the path: one of its parent "
                                                                            "names is an existing file."),
    errno.EISDIR: ("the path is a folder, where a file was expected", "Give the path of a file."),
    errno.ENOENT: ("no such file or folder", "Check the path."),
    errno.ELOOP: ("too many levels of symbolic links (a symlink loop)", "Fix the symbolic links on the path."),
    errno.ENAMETOOLONG: ("the file name is too long", "Use a shorter path or name."),
    errno.EEXIST: ("the path exists already", "Remove it or choose another path."),
    errno.EIO: ("an input/output error of the device", "Check the disk or the network file system."),
    errno.EMFILE: ("too many open files", "Raise the limit (`ulimit -n`) or use fewer workers."),
}


#: The strerror of a write that a library reported without an errno (torch's checkpoint writer,
#: numpy's "N requested and M written"); :func:`vesuvius_lab.core.files.atomic_path` raises it.
SHORT_WRITE = "the write was cut short"
_SHORT_WRITE_FIX = ("The disk is full or a file-size limit (`ulimit -f`) was hit: free some space or raise the limit "
                    "(or point --runs / --output elsewhere), then run the command again.")


def is_user_os_error(exc: OSError) -> bool:
    """Whether the OSError comes from the user's files or machine (a message), not from a bug (a traceback)."""
    return exc.errno in _OS_ERRORS or exc.strerror == SHORT_WRITE


def absence(path: "str | os.PathLike", kind: str = "file") -> str:
    """Why ``path`` is not a usable ``kind`` ("file", "folder" or "any"), to follow e.g. "data folder" in a
    message: "not found" only when nothing is there, else the real reason (a symlink loop, permission
    denied, a folder where a file was expected, ...)."""
    try:
        is_dir = os.path.isdir(os.path.realpath(path)) if os.path.exists(path) else None
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "not found (no such file or folder)" if kind == "any" else "not found"
        return f"cannot be opened: {_OS_ERRORS.get(exc.errno, (exc.strerror or 'unknown error', ''))[0]}"
    if kind == "file" and is_dir:
        return "is a folder, not a file"
    if kind == "folder" and not is_dir:
        return "is a file, not a folder"
    return "is not a regular file"


def os_error_message(exc: OSError) -> str:
    """One paragraph: the path, what failed, and what to do. Files are always written to a temporary
    name and renamed when complete, so a failed write leaves nothing half-written."""
    path = exc.filename if exc.filename is not None else None
    code = exc.errno
    if code == errno.EEXIST and path and os.path.exists(path) and not os.path.isdir(path):
        code = errno.ENOTDIR  # mkdir of a folder on the way to the target met a file of that name
    if exc.strerror == SHORT_WRITE:
        meaning, fix = SHORT_WRITE, _SHORT_WRITE_FIX
    elif code != exc.errno:
        meaning, fix = _OS_ERRORS[code]
    else:
        meaning, fix = _OS_ERRORS.get(exc.errno, (exc.strerror or str(exc) or type(exc).__name__,
                                                  "Check the path and the device, then run the command again."))
    where = f"{path}: " if path else ""
    if exc.filename2:
        where += f"(-> {exc.filename2}) "
    text = f"{where}{meaning}. {fix}"
    if code in _WRITE_ERRNOS or exc.strerror == SHORT_WRITE:
        text += (" Files are written to a temporary name and renamed when complete, so nothing half-written "
                 "was left behind.")
    return text


#: Errors that only a write meets: the message adds that nothing half-written was left.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
