"""Content digests of the input volumes, remembered by (size, mtime) so a rerun only stats files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from vesuvius_lab.core.files import write_json_atomic

_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DigestMemo:
    """File digests keyed by absolute path, reused while the file's size and mtime are unchanged."""

    def __init__(self, memo_file: Path):
        self.memo_file = Path(memo_file)
        try:
            self._known: dict[str, list] = json.loads(self.memo_file.read_text())
        except (OSError, ValueError):
            self._known = {}
        self._changed = False

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
        known = self._known.get(key)
        if known and known[:2] == stamp:
            return known[2]
        value = file_digest(path)
        self._known[key] = [*stamp, value]
        self._changed = True
        return value

    def save(self) -> None:
        if self._changed:
            write_json_atomic(self.memo_file, self._known)
            self._changed = False


def dataset_key(entries: Iterable[tuple[str, str, str]], version: str) -> str:
    """One digest for a dataset: every (id, image digest, label digest) and the conversion version."""
    digest = hashlib.sha256(version.encode())
    for case_id, image, label in sorted(entries):
        digest.update(f"\n{case_id}\t{image}\t{label}".encode())
    return digest.hexdigest()
