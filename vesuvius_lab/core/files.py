"""Atomic file writes: a temporary file beside the target, flushed, then renamed over it.

A process killed at any moment leaves either the old file or the new one, never half of one.
Every file the project writes goes through :func:`atomic_path`, which is also where the ways
libraries report a failed write without an ``OSError`` errno (torch's checkpoint writer raises
``RuntimeError``, numpy's ``np.save`` an errno-less ``OSError``) become one ``OSError`` naming the
target, which the CLI turns into a message (:func:`vesuvius_lab.core.errors.os_error_message`).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from vesuvius_lab.core.errors import SHORT_WRITE


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except (OSError, RuntimeError) as exc:
            if _is_failed_write(exc):
                raise OSError(None, SHORT_WRITE, str(target)) from exc
            if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(target)) from exc  # a write on a handle names no file
            raise
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


#: What torch's checkpoint writer says when a write fails (it raises RuntimeError, not OSError).
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


def _is_failed_write(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno is None and "written" in str(exc)  # numpy: "N requested and M written"
    return any(text in str(exc) for text in _TORCH_WRITE_FAILURES)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: Path, text: str) -> None:
    write_bytes_atomic(target, text.encode())


def write_json_atomic(target: Path, obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, default=str) + "\n")
