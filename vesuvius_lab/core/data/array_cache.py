"""Arrays cached on disk that cannot lie: every ``.npy`` entry has a checksum written beside it.

Both caches of the project use this: decoded volumes (``core/data``) and the probabilities that
ensemble members predicted (``core/inference/probability_cache.py``). An entry is
``<name>.npy`` plus ``<name>.npy.sum`` (JSON: shape, dtype, byte size, blake2b of the data),
both written atomically, the checksum last. Reading an entry checks the shape, dtype and size
against the ``.sum`` each time (cheap), the data's hash once (a few tens of ms and every byte read
for a 320^3 volume), and, where the caller gives one, a check of the values (e.g. probabilities
finite and in [0, 1]). An entry that fails any check (overwritten, truncated, another array of the
same size, a missing checksum) is deleted and reported as absent, so the caller rebuilds it.

"Once" is per entry, not per process: the writer, or the first reader that hashes it, stamps the
``.sum`` with the entry's inode, size, mtime and ctime, and a later reader whose ``stat`` gives the
same four trusts the data without reading it. Any write to the entry changes its mtime and ctime, a
replacement its inode, so a damaged entry is hashed again. As in git's index, an entry modified
within :data:`RACY_S` of a reader's check is not stamped (a write in the same timestamp tick could
not be told apart), and the writer moves the entry's mtime that far into the past before stamping.
``vlab data check`` always hashes (``full=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from vesuvius_lab.core.files import atomic_path, write_json_atomic

SUM_SUFFIX = ".sum"
_CHUNK = 1 << 24

#: array -> None when its values are fine, else what is wrong with them
ValueCheck = Callable[[np.ndarray], "str | None"]

_verified: dict[tuple[str, int, int], bool] = {}  # (path, mtime_ns, size) -> the data hash matched
#: An entry modified less than this many seconds before its hash was checked gets no stamp.
RACY_S = 2.0


def checksum_path(entry: Path) -> Path:
    return entry.with_name(entry.name + SUM_SUFFIX)


def data_digest(array: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):
        digest.update(memoryview(flat[start:start + _CHUNK]))
    return digest.hexdigest()


def write_array(entry: Path, array: np.ndarray) -> None:
    """Write ``entry`` (.npy) and its checksum, each atomically; the checksum lands first, so a reader
    that sees the entry sees its checksum too (processes that write one entry at once write the same).

    The writer hashed the data it wrote, so it stamps the entry at once. To keep a write within the same
    timestamp tick from passing for the stamped entry, the entry's mtime is first set :data:`RACY_S` into the
    past: any later write sets it to the present, which no longer matches the stamp."""
    array = np.ascontiguousarray(array)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(entry) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
        record = {"shape": list(array.shape), "dtype": array.dtype.str, "bytes": tmp.stat().st_size,
                  "blake2b": data_digest(array)}
        write_json_atomic(checksum_path(entry), record)
    past = time.time_ns() - int(RACY_S * 1e9)
    try:
        os.utime(entry, ns=(past, past))
        _stamp(entry, record, entry.stat())
    except OSError:  # replaced meanwhile by another writer of the same entry: its own stamp, or a hash later
        pass


def read_array(entry: Path, check: ValueCheck | None = None) -> np.ndarray | None:
    """The entry memory-mapped read-only, or None when it is absent or fails a check (then it is deleted)."""
    problem = entry_problem(entry, check)
    if problem == "absent":
        return None
    if problem:
        remove(entry)
        return None
    return np.load(entry, mmap_mode="r")


def entry_problem(entry: Path, check: ValueCheck | None = None, *, full: bool = False) -> str | None:
    """None for a sound entry, ``"absent"``, or what is wrong with it; ``full`` hashes the data even where
    this process or a stamp verified it already."""
    try:
        stat = entry.stat()
        array = np.load(entry, mmap_mode="r")
    except FileNotFoundError:
        return "absent"
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    try:
        expected = json.loads(checksum_path(entry).read_text())
        shape, dtype, size, digest = expected["shape"], expected["dtype"], expected["bytes"], expected["blake2b"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no valid checksum beside it"
    if list(array.shape) != list(shape) or array.dtype.str != dtype or stat.st_size != size:
        return f"holds {array.dtype} {tuple(array.shape)} ({stat.st_size} bytes), its checksum says {dtype} " \
               f"{tuple(shape)} ({size} bytes)"
    key = (str(entry), stat.st_mtime_ns, stat.st_size)
    if full or not (_verified.get(key) or expected.get("verified") == _identity(stat)):
        if data_digest(array) != digest:
            return "its data does not match its checksum"
        _verified[key] = True
        _stamp(entry, expected, stat)
    if check is not None:
        return check(array)
    return None


def _identity(stat) -> list[int]:
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _stamp(entry: Path, expected: dict, stat) -> None:
    """Record in the entry's checksum that its data matched, for this inode, size, mtime and ctime; not for an
    entry modified within RACY_S (a write in the same tick would keep all four)."""
    if expected.get("verified") == _identity(stat) or time.time_ns() - stat.st_mtime_ns < RACY_S * 1e9:
        return
    try:
        write_json_atomic(checksum_path(entry), {**expected, "verified": _identity(stat)})
    except OSError:  # a read-only cache: every process hashes once, as before
        pass


def remove(entry: Path) -> None:
    entry.unlink(missing_ok=True)
    checksum_path(entry).unlink(missing_ok=True)


def probabilities_problem(array: np.ndarray, *, slab: int = 16) -> str | None:
    """Probabilities must be finite and within [0, 1] (checked slab by slab: no full-size temporary)."""
    for start in range(0, max(array.shape[0], 1), slab):
        part = np.asarray(array[start:start + slab], dtype=np.float32)
        if not np.isfinite(part).all():
            return "it holds NaN or infinite values"
        if part.size and (part.min() < 0 or part.max() > 1):
            return f"it holds values outside [0, 1] ({float(part.min()):.3g} .. {float(part.max()):.3g})"
    return None
