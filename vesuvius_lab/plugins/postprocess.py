"""Post-processing plugins: thresholding, dust removal, hole filling, morphology, median smoothing.

Contract (see :mod:`vesuvius_lab.core.registry`): the factory receives ``device``, ``runs_dir``
and ``threshold`` (the experiment's ``[inference] threshold``) and returns a callable from a
``(D, H, W)`` numpy volume to a volume of the same shape. A float volume holds surface
probabilities in [0, 1]; a uint8 (or bool) volume is a mask, nonzero = surface. Steps that work
on masks threshold probabilities first (a voxel is surface when its probability is *above* the
threshold) and return uint8 {0, 1} masks; ``median`` keeps probabilities as probabilities.

Each step works on the whole volume with scipy.ndimage, cc3d or a small numba kernel;
``benchmarks/postprocess.py`` times them on a 320^3 chunk. The steps that need the whole volume
(hysteresis, dust removal, 3D and per-slice hole filling) also have a chunked form on dask
(``global_pass=``), which the global pass over a large volume runs with the same result.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vesuvius_lab.core.inference.postprocess import is_probabilities, to_mask
from vesuvius_lab.core.registry import plugin

Volume = np.ndarray
Step = Callable[[Volume], Volume]
Connectivity = Literal[6, 18, 26]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- helpers




def ball(radius: int) -> np.ndarray:
    """A boolean ball of the given radius (radius 1 = the 6-connected cross)."""
    grid = np.mgrid[(slice(-radius, radius + 1),) * 3]
    return (grid ** 2).sum(axis=0) <= radius * radius


def disk(radius: int, normal_axis: int) -> np.ndarray:
    """A flat disk of the given radius, one voxel thick along ``normal_axis``, in a (2r+1)^3 box."""
    flat = np.zeros((2 * radius + 1,) * 3, dtype=bool)
    middle = [slice(None)] * 3
    middle[normal_axis] = slice(radius, radius + 1)
    flat[tuple(middle)] = ball(radius)[tuple(middle)]
    return flat


def dilate_mask(mask: np.ndarray, radius: int = 1, iterations: int = 1, element: np.ndarray | None = None) -> np.ndarray:
    from scipy import ndimage

    element = ball(radius) if element is None else element
    return ndimage.binary_dilation(mask != 0, element, iterations=iterations).astype(np.uint8)


def erode_mask(mask: np.ndarray, radius: int = 1, iterations: int = 1, element: np.ndarray | None = None) -> np.ndarray:
    """Erosion that treats the outside of the volume as surface, so sheets crossing a face keep their ends."""
    from scipy import ndimage

    element = ball(radius) if element is None else element
    return ndimage.binary_erosion(mask != 0, element, iterations=iterations, border_value=1).astype(np.uint8)


def close_mask(mask: np.ndarray, radius: int, element: str = "disks") -> np.ndarray:
    """Morphological closing; never removes a voxel of ``mask``.

    ``ball``: closing with a ball. It cannot fill a hole in a thin sheet: the ball centred in the
    hole pokes out of the sheet further than the dilation reached. ``disks``: the union of three
    closings with flat disks normal to each axis; the disk lying in a sheet's plane fills holes of
    radius below ``radius``.
    """
    if element == "ball":
        closed = erode_mask(dilate_mask(mask, radius), radius)
    else:
        closed = np.zeros(mask.shape, np.uint8)
        for axis in range(3):
            flat = disk(radius, axis)
            closed |= erode_mask(dilate_mask(mask, element=flat), element=flat)
    return closed | (mask != 0)


# --------------------------------------------------------------------------- threshold


class ThresholdParams(_Params):
    value: float | None = Field(None, gt=0, lt=1, description="Plain threshold; default the experiment's [inference] threshold.")
    low: float | None = Field(None, gt=0, lt=1, description="Hysteresis: voxels above low are kept when connected to one above high.")
    high: float | None = Field(None, gt=0, lt=1, description="Hysteresis: the seed threshold (needs low).")
    connectivity: Connectivity = Field(26, description="Neighbourhood used by hysteresis: 6, 18 or 26.")

    @model_validator(mode="after")
    def _one_mode(self) -> "ThresholdParams":
        if (self.low is None) != (self.high is None):
            raise ValueError("hysteresis needs both low and high")
        if self.low is not None and self.value is not None:
            raise ValueError("give either value, or low and high (hysteresis), not both")
        if self.low is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if "connectivity" in self.model_fields_set and self.low is None:
            raise ValueError("connectivity applies only to hysteresis (low and high); remove it or give low and high")
        return self


def hysteresis(probabilities: Volume, low: float, high: float, connectivity: int = 26) -> np.ndarray:
    """Voxels above ``low`` whose connected component (above ``low``) holds a voxel above ``high``."""
    import cc3d

    labels, count = cc3d.connected_components(probabilities > low, connectivity=connectivity,
                                              return_N=True)
    keep = np.zeros(count + 1, dtype=np.uint8)
    keep[labels[probabilities > high]] = 1
    keep[0] = 0
    return keep[labels]


def _threshold_chunked(params: ThresholdParams, *, threshold: float = 0.5, **context):
    from vesuvius_lab.core.inference import chunked

    def step(volume):
        if not np.issubdtype(volume.dtype, np.floating):
            return chunked.to_mask(volume, threshold)
        if params.low is None:
            return chunked.to_mask(volume, params.value if params.value is not None else threshold)
        labels, count = chunked.label(volume > params.low, params.connectivity)
        seeded = chunked.per_label(labels, count, where=volume > params.high, reduce="any")
        seeded[0] = False
        return chunked.look_up(labels, seeded)

    return step


@plugin(ThresholdParams, halo=lambda p: "global" if p.low is not None else 0,  # hysteresis: components
        global_pass=_threshold_chunked)
def threshold(params: ThresholdParams, *, threshold: float = 0.5, **context) -> Step:
    """Probabilities to a mask: one threshold, or hysteresis (weak voxels kept when connected to strong ones)."""

    def step(volume: Volume) -> np.ndarray:
        if not is_probabilities(volume):
            return to_mask(volume, threshold)
        if params.low is not None:
            return hysteresis(volume, params.low, params.high, params.connectivity)
        return to_mask(volume, params.value if params.value is not None else threshold)

    return step


# --------------------------------------------------------------------------- components


class RemoveSmallParams(_Params):
    min_voxels: int = Field(ge=1, description="Components with fewer voxels than this are removed.")
    connectivity: Connectivity = Field(26, description="Neighbourhood defining a component: 6, 18 or 26.")


def _remove_small_chunked(params: RemoveSmallParams, *, threshold: float = 0.5, **context):
    from vesuvius_lab.core.inference import chunked

    def step(volume):
        labels, count = chunked.label(chunked.to_mask(volume, threshold), params.connectivity)
        keep = chunked.per_label(labels, count) >= params.min_voxels
        keep[0] = False
        return chunked.look_up(labels, keep)

    return step


@plugin(RemoveSmallParams, global_pass=_remove_small_chunked)
def remove_small_components(params: RemoveSmallParams, *, threshold: float = 0.5, **context) -> Step:
    """Remove connected components smaller than min_voxels (dust)."""
    import cc3d

    def step(volume: Volume) -> np.ndarray:
        mask = to_mask(volume, threshold)
        return cc3d.dust(mask, threshold=params.min_voxels, connectivity=params.connectivity,
                         in_place=True)

    return step


# --------------------------------------------------------------------------- holes


class FillHolesParams(_Params):
    mode: Literal["3d", "slices", "closing"] = Field(
        "3d", description="3d: fill cavities enclosed in 3D; slices: fill holes enclosed in each 2D slice "
                          "along `axis`; closing: morphological closing by `element` of `radius` (closes holes "
                          "in sheets, which are never enclosed; may bridge sheets closer than 2*radius).")
    axis: Literal[0, 1, 2] = Field(0, description="slices mode: the axis the slices are taken along.")
    radius: int = Field(3, ge=1, le=16, description="closing mode: radius of the element in voxels; fills holes "
                                                     "of a smaller radius.")
    element: Literal["disks", "ball"] = Field(
        "disks", description="closing mode: disks = three flat disks, one per axis (fills holes in thin "
                             "sheets); ball = a ball (fills only notches in thick sheets).")
    max_hole_voxels: int | None = Field(
        None, ge=1, description="3d/slices modes: fill only holes up to this many voxels (per slice in slices "
                                "mode); None fills every hole.")

    @model_validator(mode="after")
    def _keys_of_the_mode(self) -> "FillHolesParams":
        """A key another mode reads would be silently ignored: refuse it."""
        ignored = [key for key, modes in MODE_KEYS.items()
                   if key in self.model_fields_set and self.mode not in modes
                   and not (key == "max_hole_voxels" and self.max_hole_voxels is None)]
        if ignored:
            uses = "; ".join(f"{key} applies to mode = " + " or ".join(f'"{m}"' for m in MODE_KEYS[key])
                             for key in ignored)
            raise ValueError(f'mode = "{self.mode}" ignores {", ".join(ignored)} ({uses}); remove '
                             f"{'it' if len(ignored) == 1 else 'them'} or change mode")
        return self


#: The fill_holes keys that only some modes read.
MODE_KEYS = {"axis": ("slices",), "radius": ("closing",), "element": ("closing",),
             "max_hole_voxels": ("3d", "slices")}


def _small_holes(mask: np.ndarray, filled: np.ndarray, max_voxels: int | None) -> np.ndarray:
    """The holes (filled minus mask) having at most ``max_voxels`` voxels (all of them for None)."""
    import cc3d

    holes = (filled & ~mask).astype(np.uint8)
    if max_voxels is None:
        return holes
    # invert=True removes the components of max_voxels + 1 voxels or more.
    return cc3d.dust(holes, threshold=max_voxels + 1, connectivity=6 if holes.ndim == 3 else 4,
                     invert=True, in_place=True)


def fill_holes_3d(mask: np.ndarray, max_voxels: int | None = None) -> np.ndarray:
    from scipy import ndimage

    mask = mask != 0
    return (mask | _small_holes(mask, ndimage.binary_fill_holes(mask), max_voxels).astype(bool)).astype(np.uint8)


def fill_holes_slices(mask: np.ndarray, axis: int = 0, max_voxels: int | None = None) -> np.ndarray:
    from scipy import ndimage

    mask = np.moveaxis(mask != 0, axis, 0)
    out = mask.copy()
    for index, plane in enumerate(mask):
        if plane.any():
            out[index] |= _small_holes(plane, ndimage.binary_fill_holes(plane), max_voxels).astype(bool)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis)).astype(np.uint8)


def _fill_holes_chunked(params: FillHolesParams, *, threshold: float = 0.5, **context):
    """3d: the background's 6-connected components that touch no face of the volume (and are small enough);
    slices: each plane whole in one chunk, filled as in memory."""
    from vesuvius_lab.core.inference import chunked

    def step(volume):
        mask = chunked.to_mask(volume, threshold)
        if params.mode == "slices":
            whole_planes = {axis: -1 for axis in range(3) if axis != params.axis}
            return mask.rechunk(whole_planes).map_blocks(
                fill_holes_slices, params.axis, params.max_hole_voxels, dtype=np.uint8).rechunk(mask.chunks)
        labels, count = chunked.label(mask == 0, 6)
        enclosed = ~chunked.on_faces(labels, count)
        if params.max_hole_voxels is not None:
            enclosed &= chunked.per_label(labels, count) <= params.max_hole_voxels
        enclosed[0] = False
        return mask | chunked.look_up(labels, enclosed)

    return step


@plugin(FillHolesParams, halo=lambda p: 2 * p.radius if p.mode == "closing" else "global",
        global_pass=_fill_holes_chunked)
def fill_holes(params: FillHolesParams, *, threshold: float = 0.5, **context) -> Step:
    """Fill holes: enclosed 3D cavities, enclosed holes in 2D slices, or gaps in sheets by closing."""

    def step(volume: Volume) -> np.ndarray:
        mask = to_mask(volume, threshold)
        if params.mode == "closing":
            return close_mask(mask, params.radius, params.element)
        if params.mode == "slices":
            return fill_holes_slices(mask, params.axis, params.max_hole_voxels)
        return fill_holes_3d(mask, params.max_hole_voxels)

    return step


# --------------------------------------------------------------------------- morphology


class MorphologyParams(_Params):
    radius: int = Field(1, ge=1, le=16, description="Radius of the ball (1 = the 6-connected cross).")
    iterations: int = Field(1, ge=1, le=32, description="How many times the ball is applied.")


@plugin(MorphologyParams, halo=lambda p: p.radius * p.iterations)
def dilate(params: MorphologyParams, *, threshold: float = 0.5, **context) -> Step:
    """Grow the mask by a ball of radius r, iterations times (thickens sheets)."""
    return lambda volume: dilate_mask(to_mask(volume, threshold), params.radius, params.iterations)


@plugin(MorphologyParams, halo=lambda p: p.radius * p.iterations)
def erode(params: MorphologyParams, *, threshold: float = 0.5, **context) -> Step:
    """Shrink the mask by a ball of radius r, iterations times (the volume's faces do not erode)."""
    return lambda volume: erode_mask(to_mask(volume, threshold), params.radius, params.iterations)


class MedianParams(_Params):
    iterations: int = Field(1, ge=1, le=16, description="How many times the 3x3x3 median is applied.")


def median3(volume: Volume, iterations: int = 1) -> np.ndarray:
    """Iterated 3x3x3 median (edges replicated): float32 for probabilities; for a mask, the majority vote
    of 27 voxels (the same as thresholding the median of probabilities: the median commutes with it)."""
    from scipy import ndimage

    if not is_probabilities(volume):
        mask = (volume != 0).astype(np.float32)
        for _ in range(iterations):
            # 14 or more of 27 voxels set: mean 14/27 = 0.52 > 0.5 > 13/27 = 0.48.
            mask = (ndimage.uniform_filter(mask, size=3, mode="nearest") > 0.5).astype(np.float32)
        return mask.astype(np.uint8)
    from vesuvius_lab.plugins.median_kernel import median27

    for _ in range(iterations):
        volume = median27(volume)
    return volume


@plugin(MedianParams, halo=lambda p: p.iterations)
def median(params: MedianParams, **context) -> Step:
    """Iterated 3x3x3 median: smooths probabilities (stay probabilities) or masks (majority vote)."""
    return lambda volume: median3(volume, params.iterations)
