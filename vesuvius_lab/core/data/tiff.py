"""Reading and writing the competition's multi-page TIFF volumes (uint8, usually LZW-compressed).

:func:`check_headers` is the one cheap check of many input files before a command writes anything
(``vlab predict``, ``vlab submit``, ``vlab postprocess``): each file's header, its pages and their
data extents, its shape and its type are read without decoding a voxel, and every problem of every
file is reported at once.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

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


def read_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a TIFF from its headers, without decoding voxels; a file that cannot be opened,
    is damaged or is truncated (a page, or page data, past its end) raises :class:`VolumeError`."""
    import tifffile

    path = Path(path)
    with _tifffile_errors() as logged:
        try:
            with tifffile.TiffFile(path) as tif:
                size = path.stat().st_size
                pages = list(tif.pages)  # parses every page header: a truncated file loses pages
                ends = [o + c for page in pages for o, c in zip(page.dataoffsets, page.databytecounts)]
                series = tif.series[0]
                shape, dtype = tuple(int(n) for n in series.shape), np.dtype(series.dtype)
        except FileNotFoundError:
            raise VolumeError(f"{path}: file {absence(path)}.") from None
        except OSError as exc:
            raise VolumeError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
        except Exception as exc:  # tifffile raises many types for damaged files
            raise VolumeError(f"{path}: cannot read this TIFF ({type(exc).__name__}: {exc}). The file is corrupt "
                              "or not a TIFF; copy or write it again.") from None
    if logged or (ends and max(ends) > size):
        raise VolumeError(f"{path}: the file is truncated or damaged{f' (tifffile: {logged[0]})' if logged else ''}. "
                          "Copy or write it again.")
    return shape, dtype


def header_problems(path: Path, dtypes: Iterable[np.dtype] = (np.uint8,)) -> tuple[tuple[int, ...] | None, list[str]]:
    """(shape, problems) of one input file from its headers: readable, 3D, and of one of ``dtypes``."""
    try:
        shape, dtype = read_header(path)
    except VolumeError as exc:
        return None, [str(exc)]
    allowed = [np.dtype(d) for d in dtypes]
    problems = []
    if len(shape) != 3:
        problems.append(f"{path}: expected a 3D volume (D, H, W), found shape {shape}. Save each volume as one "
                        "multi-page TIFF with one page per slice.")
    if dtype not in allowed:
        problems.append(f"{path}: expected {' or '.join(str(d) for d in allowed)} voxels, found {dtype}.")
    return (shape if not problems else None), problems


def check_headers(paths: Iterable[Path], dtypes: Iterable[np.dtype] = (np.uint8,)) -> dict[Path, tuple[int, ...]]:
    """The shape of every input file, checked from its headers before anything is written; a
    :class:`VolumeError` lists every problem of every file at once."""
    paths, dtypes = list(paths), list(dtypes)
    shapes, problems = {}, []
    for path in paths:
        shape, found = header_problems(path, dtypes)
        problems += found
        if shape is not None:
            shapes[Path(path)] = shape
    if problems:
        bad = len(paths) - len(shapes)
        raise VolumeError(f"{bad} of {len(paths)} input file(s) cannot be used, so nothing was written:\n  "
                          + "\n  ".join(problems))
    return shapes


def write_volume(path: Path, volume: np.ndarray, *, compression: str | None = "lzw") -> None:
    """Write a 3D array as a multi-page TIFF, atomically (LZW-compressed by default, as the competition)."""
    import tifffile

    with atomic_path(Path(path)) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(volume), compression=compression, photometric="minisblack")
