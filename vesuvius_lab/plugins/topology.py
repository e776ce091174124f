"""Post-processing plugins that repair the shape and topology of sheets: what the competition's top
teams ran after thresholding.

  ``close``         closing with separate radii along depth and in-plane, optionally per component
  ``plug_holes``    adds single voxels that close a tunnel and join nothing (local Euler rule)
  ``patch_sheets``  fills gaps in each sheet, interpolated as a height field (normal by PCA)
  ``sheetness``     Hessian plate enhancement of the probabilities
  ``smooth``        Gaussian smoothing of the probabilities
  ``clear_border``  zeroes the voxels near the volume's faces

Topology follows the competition metric: foreground 6-connected, background 26-connected (the
Betti numbers), and sheets are 26-connected components (the VOI term). Same contract as
:mod:`vesuvius_lab.plugins.postprocess`: mask steps threshold probabilities at the experiment's
threshold and return uint8 {0, 1}; ``sheetness`` and ``smooth`` return float32 probabilities.
``benchmarks/postprocess.py`` times them on a 320^3 volume.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from vesuvius_lab.core.inference.postprocess import is_probabilities, to_mask
from vesuvius_lab.core.registry import plugin
from vesuvius_lab.plugins.postprocess import Step, Volume, _Params, ball

Sigma = Annotated[float, Field(gt=0, le=16)]

#: The numba kernels below, by name, with their options. Importing numba costs more than listing
#: plugins may (the registry imports this module to list it), so they are compiled on first use.
KERNELS: dict[str, dict] = {}


def kernel(function=None, **options):
    """Mark a function as a numba kernel (``@kernel`` or ``@kernel(inline="always")``)."""
    if function is None:
        return lambda function: kernel(function, **options)
    KERNELS[function.__name__] = options
    return function


@cache
def compile_kernels() -> None:
    """Replace each kernel of this module by its numba version (compiled once, cached on disk). Kernels
    call kernels through the module's names, so all are replaced before any compiles."""
    from numba import njit

    for name, options in KERNELS.items():
        globals()[name] = njit(cache=True, **options)(globals()[name])


def as_probabilities(volume: Volume) -> np.ndarray:
    """float32 probabilities; a mask counts as probabilities of 0 and 1."""
    return volume.astype(np.float32) if is_probabilities(volume) else (volume != 0).astype(np.float32)


# --------------------------------------------------------------------------- close


class CloseParams(_Params):
    radius_depth: int = Field(1, ge=0, le=16, description="Half-length of the element along depth (axis 0): "
                                                           "closes gaps of up to 2 * radius_depth voxels along depth.")
    radius_plane: int = Field(1, ge=0, le=16, description="Half-width of the element along height and width: "
                                                           "closes gaps of up to 2 * radius_plane voxels in-plane. "
                                                           "Both radii 0 leave the mask as it is (a tuner may "
                                                           "switch the step off so).")
    per_component: bool = Field(False, description="Close each 26-connected component alone, and add a voxel only "
                                                   "where one component's closing adds it and no other component "
                                                   "(or its additions) 26-touches it: sheets never join.")


def box_sizes(radius_depth: int, radius_plane: int) -> tuple[int, int, int]:
    return 2 * radius_depth + 1, 2 * radius_plane + 1, 2 * radius_plane + 1


def box_filter(volume: np.ndarray, sizes, kind: str, outside: int) -> np.ndarray:
    """Max or min over a box, as 1D passes (O(1) per voxel whatever the size); ``outside`` fills beyond the faces."""
    from scipy import ndimage

    filter1d = ndimage.maximum_filter1d if kind == "max" else ndimage.minimum_filter1d
    for axis, size in enumerate(sizes):
        if size > 1:
            volume = filter1d(volume, size, axis=axis, mode="constant", cval=outside)
    return volume


def close_box(mask: np.ndarray, sizes) -> np.ndarray:
    """Closing by a box. A box, unlike a ball, fills holes in one-voxel-thick sheets: its face lies in the sheet.
    The outside of the volume counts as surface for the erosion (as ``erode`` does)."""
    mask = (mask != 0).astype(np.uint8)
    return box_filter(box_filter(mask, sizes, "max", 0), sizes, "min", 1) | mask


def close_components(mask: np.ndarray, sizes) -> np.ndarray:
    """Each 26-connected component closed alone (exactly, in its own box); an added voxel is kept only
    where one component's closing claims it and no voxel of another component, or of another's
    additions, 26-touches it: keeping it would join the two."""
    import cc3d
    from scipy import ndimage

    compile_kernels()
    labels = cc3d.connected_components(mask != 0, connectivity=26, out_dtype=np.uint32).astype(np.int32)
    # Each box grown by 2 * radius: the closing lies within radius of the component, and the erosion
    # there looks radius further.
    reach = np.array(sizes) - 1
    boxes = np.array([[bound for s, n, grow in zip(bounds, labels.shape, reach)
                       for bound in (max(s.start - grow, 0), min(s.stop + grow, n))]
                      for bounds in ndimage.find_objects(labels)], np.int64).reshape(-1, 6)
    owners = labels.copy()
    _close_each(labels, boxes, np.array(sizes) // 2, owners)
    _drop_touching(owners, labels)
    return (owners > 0).astype(np.uint8)


@kernel
def _window_line(line, out, radius, erode):
    """out[i]: any (dilation) or all (erosion) of line[i - radius : i + radius + 1], by a running count;
    beyond the ends counts as 0 for a dilation and 1 for an erosion (the volume's outside is surface)."""
    n, outside, count = len(line), 1 if erode else 0, 0
    for k in range(-radius, radius + 1):
        count += line[k] if 0 <= k < n else outside
    for i in range(n):
        out[i] = count == 2 * radius + 1 if erode else count > 0
        count -= line[i - radius] if i - radius >= 0 else outside
        count += line[i + radius + 1] if i + radius + 1 < n else outside


@kernel
def _box_pass(volume, radii, erode):
    """Dilation or erosion of a 0/1 volume by the box of the given radii, one axis at a time."""
    for axis in range(3):
        if radii[axis] == 0:
            continue
        order = (1, 2, 0) if axis == 0 else ((0, 2, 1) if axis == 1 else (0, 1, 2))
        src = volume.transpose(order)  # the filtered axis last
        result = np.empty_like(volume)
        dst = result.transpose(order)
        line, out = np.empty(src.shape[2], np.uint8), np.empty(src.shape[2], np.uint8)
        for a in range(src.shape[0]):
            for b in range(src.shape[1]):
                line[:] = src[a, b]
                _window_line(line, out, radii[axis], erode)
                dst[a, b] = out
        volume = result
    return volume


@kernel
def _close_each(labels, boxes, radii, owners):
    """Close each component in its box; owners gets its label where the closing adds a voxel, -1 where
    two closings add the same voxel."""
    for index in range(len(boxes)):
        label = index + 1
        z0, z1, y0, y1, x0, x1 = boxes[index]
        alone = (labels[z0:z1, y0:y1, x0:x1] == label).astype(np.uint8)
        closed = _box_pass(_box_pass(alone, radii, False), radii, True)
        region = owners[z0:z1, y0:y1, x0:x1]
        for z in range(z1 - z0):
            for y in range(y1 - y0):
                for x in range(x1 - x0):
                    if closed[z, y, x] and labels[z0 + z, y0 + y, x0 + x] == 0:
                        region[z, y, x] = label if region[z, y, x] in (0, label) else -1


@kernel
def _drop_touching(owners, labels):
    """Clear each added voxel (owner set, no label) claimed twice or with a 26-neighbour owned by another
    component (another component's voxel or addition): keeping it would join the two."""
    depth, height, width = owners.shape
    keep = np.ones(owners.shape, np.bool_)
    for z in range(depth):
        for y in range(height):
            for x in range(width):
                own = owners[z, y, x]
                if own == 0 or labels[z, y, x] != 0:
                    continue
                for nz in range(max(z - 1, 0), min(z + 2, depth)):
                    for ny in range(max(y - 1, 0), min(y + 2, height)):
                        for nx in range(max(x - 1, 0), min(x + 2, width)):
                            if owners[nz, ny, nx] != 0 and owners[nz, ny, nx] != own:
                                keep[z, y, x] = False
    for z in range(depth):
        for y in range(height):
            for x in range(width):
                if not keep[z, y, x] or owners[z, y, x] < 0:
                    owners[z, y, x] = 0


@plugin(CloseParams, halo=lambda p: "global" if p.per_component else 2 * max(p.radius_depth, p.radius_plane))
def close(params: CloseParams, *, threshold: float = 0.5, **context) -> Step:
    """Closing by a box with its own radius along depth and in-plane; per_component never joins sheets."""
    sizes = box_sizes(params.radius_depth, params.radius_plane)

    def step(volume: Volume) -> np.ndarray:
        mask = to_mask(volume, threshold)
        return close_components(mask, sizes) if params.per_component else close_box(mask, sizes)

    return step


# --------------------------------------------------------------------------- plug_holes


class PlugHolesParams(_Params):
    iterations: int = Field(2, ge=1, le=32, description="Passes over the volume; stops early when a pass adds nothing.")


# The kernels below take the mask padded by one background voxel, so neighbours need no bounds checks.


@kernel
def euler_gain(fg, z, y, x):
    """The rise of the Euler characteristic (the metric's cubical complex: a cell counts when all its
    corners are foreground) when background voxel (z, y, x) is added. Summed over the 8 cubes having the
    voxel as a corner, each cube's share of the new cells, times 8: the voxel 1/8, an edge 1/4 (4 cubes
    share it), a face 1/2 (2 cubes), the cube 1."""
    gain8 = 0
    for sz in (-1, 1):
        for sy in (-1, 1):
            for sx in (-1, 1):
                a = fg[z + sz, y, x] != 0
                b = fg[z, y + sy, x] != 0
                c = fg[z, y, x + sx] != 0
                ab = a and b and fg[z + sz, y + sy, x] != 0
                ac = a and c and fg[z + sz, y, x + sx] != 0
                bc = b and c and fg[z, y + sy, x + sx] != 0
                cube = ab and ac and bc and fg[z + sz, y + sy, x + sx] != 0
                gain8 += 1 - 2 * (int(a) + int(b) + int(c)) + 4 * (int(ab) + int(ac) + int(bc)) - 8 * int(cube)
    return gain8 // 8


@kernel
def _neighbour_label(fg, labels, z, y, x, reach):
    """The one label of the foreground neighbours (reach 1: the 6 face neighbours, 3: all 26); 0 for
    none, -1 for several."""
    found = 0
    for dz in range(-1, 2):
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                steps = abs(dz) + abs(dy) + abs(dx)
                if steps == 0 or steps > reach or not fg[z + dz, y + dy, x + dx]:
                    continue
                label = labels[z + dz, y + dy, x + dx]
                if found == 0:
                    found = label
                elif label != found:
                    return -1
    return found


@kernel
def enclosed_background(fg, z, y, x, radius, seen, stack):
    """Background components (26-connected) of the box of ``radius`` around (z, y, x), clipped to the
    volume, that touch none of its faces: the cavities a change at the centre can make, seen locally.
    ``seen`` and ``stack`` are scratch buffers of at least (2 radius + 1)^3 voxels."""
    z0, y0, x0 = max(z - radius, 1), max(y - radius, 1), max(x - radius, 1)
    z1, y1, x1 = (min(z + radius + 1, fg.shape[0] - 1), min(y + radius + 1, fg.shape[1] - 1),
                  min(x + radius + 1, fg.shape[2] - 1))
    seen[:] = False
    enclosed = 0
    for sz in range(z0, z1):
        for sy in range(y0, y1):
            for sx in range(x0, x1):
                if fg[sz, sy, sx] or seen[sz - z0, sy - y0, sx - x0]:
                    continue
                seen[sz - z0, sy - y0, sx - x0] = True
                stack[0, 0], stack[0, 1], stack[0, 2] = sz, sy, sx
                size, open_ = 1, False
                while size:
                    size -= 1
                    cz, cy, cx = stack[size, 0], stack[size, 1], stack[size, 2]
                    if cz in (z0, z1 - 1) or cy in (y0, y1 - 1) or cx in (x0, x1 - 1):
                        open_ = True
                    for nz in range(max(cz - 1, z0), min(cz + 2, z1)):
                        for ny in range(max(cy - 1, y0), min(cy + 2, y1)):
                            for nx in range(max(cx - 1, x0), min(cx + 2, x1)):
                                if not fg[nz, ny, nx] and not seen[nz - z0, ny - y0, nx - x0]:
                                    seen[nz - z0, ny - y0, nx - x0] = True
                                    stack[size, 0], stack[size, 1], stack[size, 2] = nz, ny, nx
                                    size += 1
                if not open_:
                    enclosed += 1
    return enclosed


#: How far around an added voxel a new cavity is looked for (as the hole stitcher's topology merge does).
CAVITY_RADIUS = 2


@kernel
def _plug_pass(fg, labels6, labels26):
    """One raster pass adding each background voxel that closes a tunnel and joins nothing; voxels added
    earlier in the pass count for later ones. Returns how many were added."""
    side = 2 * CAVITY_RADIUS + 1
    seen = np.zeros((side, side, side), np.bool_)
    stack = np.empty((side ** 3, 3), np.int64)
    added = 0
    for z in range(1, fg.shape[0] - 1):
        for y in range(1, fg.shape[1] - 1):
            for x in range(1, fg.shape[2] - 1):
                if fg[z, y, x]:
                    continue
                # With the components unchanged (one label in both neighbourhoods) and no new cavity,
                # the rise of the Euler characteristic is the number of tunnels closed.
                label6 = _neighbour_label(fg, labels6, z, y, x, 1)
                if label6 <= 0 or euler_gain(fg, z, y, x) <= 0:
                    continue
                label26 = _neighbour_label(fg, labels26, z, y, x, 3)
                if label26 <= 0:
                    continue
                before = enclosed_background(fg, z, y, x, CAVITY_RADIUS, seen, stack)
                fg[z, y, x] = 1
                if enclosed_background(fg, z, y, x, CAVITY_RADIUS, seen, stack) > before:
                    fg[z, y, x] = 0
                    continue
                labels6[z, y, x], labels26[z, y, x] = label6, label26
                added += 1
    return added


def plug_tunnels(mask: np.ndarray, iterations: int = 2) -> np.ndarray:
    """uint8: ``mask`` plus the voxels that each close a tunnel without joining components or making cavities."""
    import cc3d

    compile_kernels()
    fg = np.pad((mask != 0).astype(np.uint8), 1)
    labels6 = cc3d.connected_components(fg, connectivity=6, out_dtype=np.uint32)
    labels26 = cc3d.connected_components(fg, connectivity=26, out_dtype=np.uint32)
    for _ in range(iterations):
        if not _plug_pass(fg, labels6, labels26):
            break
    return np.ascontiguousarray(fg[1:-1, 1:-1, 1:-1])


@plugin(PlugHolesParams)
def plug_holes(params: PlugHolesParams, *, threshold: float = 0.5, **context) -> Step:
    """Add single voxels that close a tunnel (raise the Euler characteristic) and join nothing."""
    return lambda volume: plug_tunnels(to_mask(volume, threshold), params.iterations)


# --------------------------------------------------------------------------- patch_sheets


class PatchSheetsParams(_Params):
    min_voxels: int = Field(1000, ge=1, description="Components (26-connected) with fewer voxels are left alone.")
    max_gap_area: int = Field(400, ge=1, description="Largest gap patched, in voxel columns of the sheet's height "
                                                      "field (about its area in voxels^2).")
    clearance: int = Field(2, ge=0, le=16, description="A patch is rejected when a voxel of another component "
                                                        "lies within this many voxels of it.")
    thickness: float | None = Field(None, gt=0, le=16, description="Thickness of a patch in voxels along its "
                                                                   "height axis (the coordinate axis nearest the "
                                                                   "sheet's normal); None: the sheet's own, "
                                                                   "around the gap.")


class SheetGrid:
    """A sheet as a height field. PCA of its voxel coordinates gives the normal (the smallest-variance
    axis); heights run along the coordinate axis nearest the normal, over unit cells of the other two
    axes: one cell per voxel column, so a sheet without gaps covers every cell of its footprint (cells
    over the tilted principal plane itself alias: they leave empty cells inside a whole sheet). Every
    plane is such a height field: its normal has a component of at least 1/sqrt(3) along some axis.
    Per cell: the lowest and highest voxel of the column."""

    def __init__(self, points: np.ndarray):
        centred = points - points.mean(axis=0)
        _, axes = np.linalg.eigh(centred.T @ centred)              # the scatter matrix: defined for one voxel too
        self.normal = axes[:, 0]                                     # eigh sorts the variances ascending
        self.axis = int(np.argmax(np.abs(self.normal)))
        self.plane = [a for a in range(3) if a != self.axis]
        self.origin = points[:, self.plane].min(axis=0)
        cells = points[:, self.plane] - self.origin
        flat = np.ravel_multi_index(cells.T, tuple(cells.max(axis=0) + 1))
        self.low = np.full(tuple(cells.max(axis=0) + 1), np.iinfo(np.int64).max)
        self.high = np.full(self.low.shape, np.iinfo(np.int64).min)
        np.minimum.at(self.low.ravel(), flat, points[:, self.axis])
        np.maximum.at(self.high.ravel(), flat, points[:, self.axis])
        self.occupied = self.high >= self.low

    def voxels(self, cells: np.ndarray, heights: np.ndarray) -> np.ndarray:
        """(N, 3) voxel coordinates of cells (N, 2) at heights (N,)."""
        out = np.empty((len(cells), 3), np.int64)
        out[:, self.plane] = cells + self.origin
        out[:, self.axis] = heights
        return out


#: Cells around a gap that a patch also fills: a hole's rim is often thinned, and a patch meeting a
#: thinned rim leaves tunnels at the seam. Heights are taken from the ring of EDGE cells beyond (a
#: ring a few cells wide, so that a quadratic through it is well determined).
RIM, EDGE = 1, 3


def gap_regions(occupied: np.ndarray, max_area: int):
    """(patch cells, edge cells) of each enclosed gap of the footprint of at most ``max_area`` cells: the
    gap and its rim (the cells within RIM of it), and the occupied cells within EDGE beyond."""
    from scipy import ndimage

    square = np.ones((3, 3), bool)
    gaps, _ = ndimage.label(ndimage.binary_fill_holes(occupied) & ~occupied)
    for index, bounds in enumerate(ndimage.find_objects(gaps), start=1):
        box = tuple(slice(max(s.start - RIM - EDGE, 0), s.stop + RIM + EDGE) for s in bounds)
        gap = gaps[box] == index
        if gap.sum() > max_area:
            continue
        patch = ndimage.binary_dilation(gap, square, iterations=RIM)
        edge = ndimage.binary_dilation(patch, square, iterations=EDGE) & ~patch & occupied[box]
        offset = np.array([s.start for s in box])
        yield np.argwhere(patch) + offset, np.argwhere(edge) + offset


def interpolate_heights(known: np.ndarray, heights: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Heights at cells ``wanted`` (N, 2) from cells ``known`` (M, 2): the least-squares quadratic through
    the known heights plus their residuals weighted by inverse squared distance. The quadratic keeps a
    tilted or curved sheet so (weighting the heights alone flattens it, leaving steps at the seam)."""
    def quadratic_terms(cells: np.ndarray) -> np.ndarray:
        i, j = (cells - known.mean(axis=0)).T
        return np.column_stack([np.ones(len(cells)), i, j, i * i, i * j, j * j])

    design = quadratic_terms(known)
    coefficients = np.linalg.lstsq(design, heights, rcond=None)[0]
    weights = 1.0 / ((wanted[:, None, :] - known[None, :, :]) ** 2).sum(axis=-1)
    residuals = heights - design @ coefficients
    return quadratic_terms(wanted) @ coefficients + weights @ residuals / weights.sum(axis=1)


def gap_patch(grid: SheetGrid, gap: np.ndarray, edge: np.ndarray, shape, thickness: float | None) -> np.ndarray | None:
    """(N, 3) voxels filling one gap: per cell of ``gap``, the voxels within half the thickness of the
    mid-height interpolated from the edge cells. None where the edge is no height field."""
    low, high = grid.low[tuple(edge.T)], grid.high[tuple(edge.T)]
    extent = high - low + 1
    if extent.max() > 2 * np.median(extent) + 2:
        return None  # the edge spans several layers (a fold, or sheets merged): the heights mean nothing
    # At least the extent of a tunnel-free digital plane of this normal along the height axis.
    half = max(thickness or np.median(extent), np.abs(grid.normal).sum() / np.abs(grid.normal[grid.axis])) / 2
    mid = interpolate_heights(edge, (low + high) / 2, gap)
    heights = np.ceil(mid - half - 1e-6)[:, None] + np.arange(int(2 * half) + 2)
    keep = (heights <= (mid + half + 1e-6)[:, None]) & (heights >= 0) & (heights < shape[grid.axis])
    cells = np.repeat(gap, heights.shape[1], axis=0)[keep.ravel()]
    return grid.voxels(cells, heights.ravel()[keep.ravel()].astype(np.int64))


def patch_gaps(mask: np.ndarray, params: PatchSheetsParams) -> np.ndarray:
    """uint8: ``mask`` with the gaps of its sheets patched; a patch is kept only if no other component lies
    within ``clearance`` and it closes a tunnel, joining nothing (the hole stitcher's topology merge)."""
    import cc3d
    from scipy import ndimage

    from vesuvius_lab.core.inference.stitch_merge import close_tunnels

    mask = mask != 0
    labels = cc3d.connected_components(mask, connectivity=26)
    sizes = np.bincount(labels.ravel())
    proposed = np.zeros(mask.shape, bool)
    near = ball(params.clearance)
    for index, bounds in enumerate(ndimage.find_objects(labels), start=1):
        if bounds is None or sizes[index] < params.min_voxels:
            continue
        offset = np.array([s.start for s in bounds])
        grid = SheetGrid(np.argwhere(labels[bounds] == index) + offset)
        for gap, edge in gap_regions(grid.occupied, params.max_gap_area):
            patch = gap_patch(grid, gap, edge, mask.shape, params.thickness)
            if patch is None or not len(patch) or touches_other(labels, patch, index, near):
                continue
            labels[tuple(patch.T)] = np.where(labels[tuple(patch.T)] == 0, index, labels[tuple(patch.T)])
            proposed[tuple(patch.T)] = True
    return close_tunnels(mask, proposed & ~mask)


def touches_other(labels: np.ndarray, voxels: np.ndarray, own: int, near: np.ndarray) -> bool:
    """Whether a voxel of another component lies within the element ``near`` of the given voxels."""
    from scipy import ndimage

    reach = near.shape[0] // 2
    lo = np.maximum(voxels.min(axis=0) - reach, 0)
    hi = voxels.max(axis=0) + reach + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    patch = np.zeros(labels[box].shape, bool)
    patch[tuple((voxels - lo).T)] = True
    found = labels[box][ndimage.binary_dilation(patch, near)]
    return bool(((found != 0) & (found != own)).any())


@plugin(PatchSheetsParams)
def patch_sheets(params: PatchSheetsParams, *, threshold: float = 0.5, **context) -> Step:
    """Fill gaps in each sheet by interpolating it as a height field (normal by PCA); never joins sheets."""
    return lambda volume: patch_gaps(to_mask(volume, threshold), params)


# --------------------------------------------------------------------------- sheetness


class SheetnessParams(_Params):
    sigmas: list[Sigma] = Field([1.5], min_length=1, max_length=6,
                                description="Gaussian scales in voxels; a sheet about 2 * sigma thick responds most. "
                                            "The response is the maximum over the scales (each scale costs about "
                                            "as much as the first).")
    mode: Literal["replace", "blend"] = Field("blend", description="replace: the output is the sheetness; blend: "
                                                                   "(1 - weight) * probability + weight * sheetness.")
    weight: float = Field(0.5, ge=0, le=1, description="blend mode: the sheetness's share.")

    @model_validator(mode="after")
    def _weight_needs_blend(self) -> "SheetnessParams":
        if "weight" in self.model_fields_set and self.mode != "blend":
            raise ValueError('weight applies to mode = "blend"; remove it or change mode')
        return self


#: The scale-normalised response (sigma^2 * -lambda3) of the best-matching ideal plate of value 1: a
#: slab 2 sigma thick, 2 |G'(sigma)| sigma^2 = 2 exp(-1/2) / sqrt(2 pi); dividing by it maps plates to ~1.
PLATE_RESPONSE = 2 * np.exp(-0.5) / np.sqrt(2 * np.pi)
PLATE_ALPHA, PLATE_BETA = 0.5, 0.5  # Descoteaux et al. 2006 sheetness: tolerance to tube-likeness and blob-likeness


@kernel(inline="always")
def symmetric_eigenvalues(a, b, c, d, e, f):
    """Eigenvalues of [[a, d, e], [d, b, f], [e, f, c]] by the trigonometric closed form, sorted by magnitude."""
    q = (a + b + c) / 3
    p1 = d * d + e * e + f * f
    p = np.sqrt(((a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2 * p1) / 6)
    if p < 1e-12:
        return q, q, q
    a, b, c, d, e, f = (a - q) / p, (b - q) / p, (c - q) / p, d / p, e / p, f / p
    r = min(max((a * (b * c - f * f) - d * (d * c - f * e) + e * (d * f - b * e)) / 2, -1.0), 1.0)
    phi = np.arccos(r) / 3
    l1 = q + 2 * p * np.cos(phi)
    l3 = q + 2 * p * np.cos(phi + 2 * np.pi / 3)
    l2 = 3 * q - l1 - l3
    # sort by |.|: insertion of three values
    if abs(l1) > abs(l2):
        l1, l2 = l2, l1
    if abs(l2) > abs(l3):
        l2, l3 = l3, l2
    if abs(l1) > abs(l2):
        l1, l2 = l2, l1
    return l1, l2, l3


@kernel
def _plate_measure(hzz, hyy, hxx, hzy, hzx, hyx, scale, out):
    """out = max(out, plate measure): bright plates have lambda3 << 0 and lambda1, lambda2 ~ 0."""
    depth, height, width = out.shape
    for z in range(depth):
        for y in range(height):
            for x in range(width):
                l1, l2, l3 = symmetric_eigenvalues(hzz[z, y, x], hyy[z, y, x], hxx[z, y, x],
                                                   hzy[z, y, x], hzx[z, y, x], hyx[z, y, x])
                if l3 >= 0:
                    continue
                sheet = abs(l2) / abs(l3)                                  # ~0 for a plate, ~1 for a tube
                blob = abs(2 * abs(l3) - abs(l2) - abs(l1)) / abs(l3)     # ~2 for a plate, ~0 for a blob
                value = (-l3 * scale * np.exp(-sheet * sheet / (2 * PLATE_ALPHA ** 2))
                         * (1 - np.exp(-blob * blob / (2 * PLATE_BETA ** 2))))
                if value > out[z, y, x]:
                    out[z, y, x] = value


def gaussian_hessian(block: np.ndarray, sigma: float, core: slice) -> list[np.ndarray]:
    """The Gaussian second derivatives (zz, yy, xx, zy, zx, yx) of ``block`` on its depth slices ``core``:
    the same 1D passes as ``gaussian_filter(order=...)``, shared between the six. Depth goes first
    (3 passes, the slow strided axis; the halo is cropped after it), then height (6) and width (6)."""
    from scipy import ndimage

    def derivative(volume, axis, order):
        return ndimage.gaussian_filter1d(volume, sigma, axis=axis, order=order, mode="nearest")

    along_z = [derivative(block, 0, order)[core] for order in range(3)]
    zy = {(i, j): derivative(along_z[i], 1, j) for i, j in ((2, 0), (0, 2), (0, 0), (1, 1), (1, 0), (0, 1))}
    return [derivative(zy[2, 0], 2, 0), derivative(zy[0, 2], 2, 0), derivative(zy[0, 0], 2, 2),
            derivative(zy[1, 1], 2, 0), derivative(zy[1, 0], 2, 1), derivative(zy[0, 1], 2, 1)]


def sheetness_map(volume: np.ndarray, sigmas, slab: int = 64) -> np.ndarray:
    """float32 in [0, 1]: the plate measure, max over scales, in slabs of depth (each with a halo as wide
    as the Gaussian kernel, so the result equals the whole-volume one)."""
    compile_kernels()
    volume = volume.astype(np.float32, copy=False)
    out = np.zeros(volume.shape, np.float32)
    for sigma in sigmas:
        halo = int(4.0 * sigma + 0.5)  # gaussian_filter's kernel radius (truncate = 4)
        for start in range(0, volume.shape[0], slab):
            stop = min(start + slab, volume.shape[0])
            lo, hi = max(start - halo, 0), min(stop + halo, volume.shape[0])
            hessian = gaussian_hessian(volume[lo:hi], sigma, slice(start - lo, stop - lo))
            _plate_measure(*hessian, sigma * sigma / PLATE_RESPONSE, out[start:stop])
    return np.clip(out, 0, 1, out=out)


@plugin(SheetnessParams, halo=lambda p: max(int(4.0 * s + 0.5) for s in p.sigmas))  # gaussian radius
def sheetness(params: SheetnessParams, **context) -> Step:
    """Hessian plate enhancement: raises sheet-like probabilities over blobs and tubes (probabilities out)."""

    def step(volume: Volume) -> np.ndarray:
        prob = as_probabilities(volume)
        plates = sheetness_map(prob, params.sigmas)
        if params.mode == "replace":
            return plates
        return np.clip((1 - params.weight) * prob + params.weight * plates, 0, 1).astype(np.float32)

    return step


# --------------------------------------------------------------------------- smooth, clear_border


class SmoothParams(_Params):
    sigma: Sigma | tuple[Sigma, Sigma, Sigma] = Field(1.0, description="Gaussian sigma in voxels, or one per "
                                                                       "axis [depth, height, width].")


@plugin(SmoothParams, halo=lambda p: max(int(4.0 * s + 0.5) for s in (p.sigma if isinstance(p.sigma, tuple) else (p.sigma,))))
def smooth(params: SmoothParams, **context) -> Step:
    """Gaussian smoothing of probabilities (a mask counts as 0/1 probabilities); probabilities out."""
    from scipy import ndimage

    def step(volume: Volume) -> np.ndarray:
        return np.clip(ndimage.gaussian_filter(as_probabilities(volume), params.sigma, mode="nearest"), 0, 1)

    return step


class ClearBorderParams(_Params):
    width: int = Field(1, ge=1, le=64, description="Voxels zeroed at each of the six faces.")


def _clear_border_chunked(params: ClearBorderParams, **context):
    def step(volume):
        shape = volume.shape

        def clear(block: np.ndarray, block_info=None) -> np.ndarray:
            out = block.copy()
            for axis, (start, stop) in enumerate(block_info[0]["array-location"]):
                faces = np.moveaxis(out, axis, 0)
                faces[:max(0, params.width - start)] = 0
                faces[max(0, shape[axis] - params.width - start):] = 0
            return out

        return volume.map_blocks(clear, dtype=volume.dtype)

    return step


@plugin(ClearBorderParams, global_pass=_clear_border_chunked)
def clear_border(params: ClearBorderParams, **context) -> Step:
    """Zero the voxels within width of the volume's faces (predictions there lack context); keeps the dtype."""

    def step(volume: Volume) -> np.ndarray:
        out = volume.copy()
        for axis in range(3):
            faces = np.moveaxis(out, axis, 0)  # a view: writing it writes out
            faces[:params.width] = 0
            faces[-params.width:] = 0
        return out

    return step
