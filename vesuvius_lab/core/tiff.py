"""Reading and writing the competition's multi-page TIFF volumes (uint8, usually LZW-compressed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import atomic_path


class VolumeError(UserError):
    """A volume file that cannot be used: unreadable, truncated, wrong dimensionality or type."""


def read_tiff(path: Path) -> np.ndarray:
    """Decode a TIFF file into an array; a corrupt or truncated file raises :class:`VolumeError`."""
    import tifffile

    path = Path(path)
    try:
        return tifffile.imread(path)
    except FileNotFoundError:
        raise VolumeError(f"{path}: file not found.") from None
    except Exception as exc:  # tifffile raises many types for damaged files
        raise VolumeError(f"{path}: cannot decode this TIFF ({type(exc).__name__}: {exc}). The file is "
                          "corrupt or truncated; copy or download it again.") from None


def read_volume(path: Path) -> np.ndarray:
    """Read a 3D uint8 volume (D, H, W), or raise :class:`VolumeError` saying what is wrong."""
    volume = read_tiff(path)
    if volume.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume (D, H, W), found {volume.ndim}D with shape "
                          f"{volume.shape}. Save each volume as one multi-page TIFF with one page per slice.")
    if volume.dtype != np.uint8:
        raise VolumeError(f"{path}: expected uint8 voxels, found {volume.dtype}. Convert the volume to uint8 "
                          "(0-255) before using it.")
    return volume


def write_volume(path: Path, volume: np.ndarray, *, compression: str | None = "lzw") -> None:
    """Write a 3D array as a multi-page TIFF, atomically (LZW-compressed by default, as the competition)."""
    import tifffile

    with atomic_path(Path(path)) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(volume), compression=compression, photometric="minisblack")
