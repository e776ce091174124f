"""Whole-volume operations on chunked (dask) arrays, for the global pass's post-processing steps.

Connected components come from :mod:`vesuvius_lab.core.inference.chunked_labels`, which labels each
chunk and joins the labels across chunk faces, so a component that crosses any number of chunks gets
one label, the same components as ``scipy.ndimage.label`` or cc3d on the whole array. The per-label tables built here
(sizes, "holds a seed", "touches a face") come from each chunk's distinct labels, so a worker holds
one chunk and the tables hold one entry per component: memory per worker does not grow with the volume.

Labels are kept on disk (:func:`persist`, in the pass's scratch folder) and read back for each table
and for the result, so that a labelling is computed once and nothing of the volume's size is ever held
in memory.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

_scratch: list[Path] = []
_names = itertools.count()


@contextmanager
def scratch_space(folder: Path) -> Iterator[None]:
    """While open, :func:`persist` writes arrays under ``folder`` (which every dask worker must reach)."""
    _scratch.append(Path(folder))
    try:
        yield
    finally:
        _scratch.pop()


def persist(array):
    """``array`` computed once and read back lazily: written to the scratch folder as zarr, or (outside a
    :func:`scratch_space`, e.g. on small arrays in tests) kept in memory."""
    if not _scratch:
        return array.persist()
    import dask.array as da

    regular = array.rechunk(tuple(max(sizes) for sizes in array.chunks))
    path = str(_scratch[-1] / f"{next(_names)}.zarr")
    da.to_zarr(regular, path, overwrite=True, compute=True)
    return da.from_zarr(path).rechunk(array.chunks)

#: The neighbourhoods of connected components: face (6), edge (18) or corner (26) neighbours.
RANKS = {6: 1, 18: 2, 26: 3}


def to_mask(volume, threshold: float):
    """The chain's last threshold on a dask array: uint8 {0, 1}, float voxels above ``threshold`` or
    nonzero voxels of a mask (as :func:`vesuvius_lab.core.inference.postprocess.to_mask`)."""
    if np.issubdtype(volume.dtype, np.floating):
        return (volume > threshold).astype(np.uint8)
    return (volume != 0).astype(np.uint8)


def structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, RANKS[connectivity])


def label(mask, connectivity: int):
    """The components of a boolean dask array: (labels, on disk; the number of components)."""
    from vesuvius_lab.core.inference import chunked_labels

    return chunked_labels.label(mask.astype(bool), structure(connectivity), persist)


def _distinct(block: np.ndarray, where: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    values = block if where is None else block[where]
    return np.unique(values, return_counts=True)


def per_label(labels, count: int, *, where=None, dtype=np.int64, reduce: str = "sum") -> np.ndarray:
    """A table indexed by label (0..count): the voxels of each label (``reduce="sum"``), or whether any of
    its voxels is where ``where`` (a boolean dask array of the labels' chunks) holds (``reduce="any"``)."""
    import dask

    blocks = labels.to_delayed().ravel()
    masks = where.to_delayed().ravel() if where is not None else [None] * len(blocks)
    parts = dask.compute(*[dask.delayed(_distinct)(block, mask) for block, mask in zip(blocks, masks)])
    table = np.zeros(count + 1, dtype if reduce == "sum" else bool)
    for found, counts in parts:
        if reduce == "sum":
            np.add.at(table, found, counts)
        else:
            table[found] = True
    return table


def on_faces(labels, count: int) -> np.ndarray:
    """A bool table indexed by label: the labels that have a voxel on one of the array's six faces."""
    faces = [labels[index] for index in (0, -1)] + [labels[:, index] for index in (0, -1)] + \
            [labels[:, :, index] for index in (0, -1)]
    table = np.zeros(count + 1, bool)
    for face in faces:
        table |= per_label(face, count, reduce="any")
    return table


def look_up(labels, table: np.ndarray, dtype=np.uint8):
    """``table[labels]`` chunk by chunk (the table travels with each chunk's task)."""
    return labels.map_blocks(lambda block: table[block].astype(dtype, copy=False), dtype=dtype)

