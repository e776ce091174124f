"""Reading and writing the competition's multi-page TIFF volumes (uint8, usually LZW-compressed)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from vesuvius_lab.core.errors import UserError, absence
from vesuvius_lab.core.files import atomic_path


class VolumeError(UserError):
    """A volume file that cannot be used: unreadable, truncated, wrong dimensionality or type."""


@contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """Collect what tifffile logs at ERROR level while decoding.

    tifffile reads a truncated multi-page file without raising: it logs "invalid page offset" and
    returns the pages it found (or just the first page), so a damaged volume would pass as a
    smaller one. Its log is the only reliable sign; capturing it also keeps it off the console.
    """
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler = Collect(level=logging.ERROR)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def read_tiff(path: Path) -> np.ndarray:
    """Decode a TIFF of any shape and type; a corrupt or truncated file raises :class:`VolumeError`."""
    import tifffile

    path = Path(path)
    with _tifffile_errors() as logged:
        try:
            array = tifffile.imread(path)
        except FileNotFoundError:
            raise VolumeError(f"{path}: file {absence(path)}.") from None
        except Exception as exc:  # tifffile raises many types for damaged files
            if not logged:
                raise VolumeError(f"{path}: cannot decode this TIFF ({type(exc).__name__}: {exc}). The file "
                                  "is corrupt or truncated; copy or download it again.") from None
    if logged:
        raise VolumeError(f"{path}: the file is truncated or damaged (tifffile: {logged[0]}). Copy or "
                          "download it again.")
    return array


def volume_problems(path: Path, volume: np.ndarray) -> list[str]:
    """What keeps a decoded array from being a (D, H, W) uint8 volume, one message per problem."""
    problems = []
    if volume.ndim != 3:
        problems.append(f"{path}: expected a 3D volume (D, H, W), found {volume.ndim}D with shape "
                        f"{volume.shape}. Save each volume as one multi-page TIFF with one page per slice.")
    if volume.dtype != np.uint8:
        problems.append(f"{path}: expected uint8 voxels, found {volume.dtype}. Convert the volume to uint8 "
                        "(0-255) before using it.")
    return problems


def read_volume(path: Path) -> np.ndarray:
    """Read a 3D uint8 volume (D, H, W), or raise :class:`VolumeError` saying what is wrong."""
    volume = read_tiff(path)
    problems = volume_problems(path, volume)
    if problems:
        raise VolumeError(" ".join(problems))
    return volume


def write_volume(path: Path, volume: np.ndarray, *, compression: str | None = "lzw") -> None:
    """Write a 3D array as a multi-page TIFF, atomically (LZW-compressed by default, as the competition)."""
    import tifffile

    with atomic_path(Path(path)) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(volume), compression=compression, photometric="minisblack")
