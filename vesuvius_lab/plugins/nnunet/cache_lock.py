"""An exclusive lock on the shared nnU-Net cache, so that concurrent runs never build the same thing twice."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def cache_lock(folder: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (a no-op where ``fcntl`` does not exist)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: runs must not share a cache concurrently
        yield
        return
    with open(folder / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run to release the nnU-Net cache {folder} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
