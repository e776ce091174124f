"""Synthetic scroll CT with labels, in the competition layout: the project's built-in demo data.

A chunk of a rolled scroll seen in CT is a stack of wrapped papyrus sheets: bright, wavy, roughly
parallel layers over dark air, sometimes pressed together, sometimes frayed or split into their
two fibre plies. :func:`generate_volume` builds one such chunk from a few smooth random fields:

* the scroll's axis runs roughly along D, its centre lies outside the chunk, so each (H, W) slice
  shows arcs of concentric sheets; every voxel gets a radius ``r`` and an arc length ``s``;
* a shared warp field, long along the axis, makes all sheets wavy together; after removing it,
  sheet ``k`` is the band ``B_k(z, s) <= r <= B_k(z, s) + t_k(z, s)`` around its own nominal
  radius, with a smooth deviation that varies the spacing; a deviation that would cross the
  previous sheet presses against it instead, so sheets touch but never intersect;
* the sheet's outer ply carries fibres along ``s``, its inner ply fibres along the axis; the
  inner ply may peel off (delamination) and holes may cut through the sheet (fraying);
* the image is that density scanned: air and papyrus levels, blur, correlated noise and faint
  ring artefacts; the label is 1 on the outer surface layer of each sheet (2-3 voxels, a
  membrane following the sheet), 2 (unlabeled) on blobs and a border at every face, 0 elsewhere.

Everything is vectorised numpy/scipy: a 64x128x128 volume costs about 0.4 s of CPU.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from vesuvius_lab.core import children
from vesuvius_lab.core.console import err
from vesuvius_lab.core.data.tiff import write_volume
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.files import write_text_atomic

Shape3 = tuple[int, int, int]

#: Defaults sized for a demo that trains a small model for a couple of minutes on 2 CPU cores;
#: H and W match the default training window (16, 128, 128) so a patch never needs padding.
DEFAULT_SHAPE: Shape3 = (64, 128, 128)
DEFAULT_N = 8
DEFAULT_SCROLLS = 3
DEFAULT_TEST = 2

UNLABELED = 2  # label values: 0 background, 1 surface, 2 unlabeled (ignored by losses and metric)
LABEL_THICKNESS = 2.5  # voxels along the sheet normal that the surface label covers
MARKER = ".vlab-synthetic.json"  # written into every generated folder; allows regenerating in place
LAYOUT_DIRS = ("train_images", "train_labels", "test_images")


@dataclass(frozen=True)
class ScrollStyle:
    """What the volumes of one scroll share: how its sheets are wound and how it was scanned."""

    sheet_thickness: float  # mean sheet thickness, voxels
    gap: float  # mean air gap between sheets, voxels
    touching: float  # share of sheets whose spacing varies enough to press against a neighbour
    waviness: float  # amplitude of the shared warp, voxels
    fray: float  # 0..1: how much the sheets are holed and delaminated
    air: float  # grey level of air
    papyrus: float  # grey level of papyrus
    noise: float  # standard deviation of the scan noise, grey levels
    blur: float  # point-spread sigma, voxels

    @classmethod
    def draw(cls, rng: np.random.Generator, family: str = "base") -> "ScrollStyle":
        """A style drawn from the ranges of ``family`` (see :data:`FAMILIES`)."""
        ranges = style_ranges(family)
        return cls(**{name: rng.uniform(*bounds) for name, bounds in ranges.items()})


#: The ranges every scroll is drawn from unless its family changes some, in the order they are drawn (the
#: same seed gives the same style; a family replaces ranges in place, so the order holds).
BASE_RANGES: dict[str, tuple[float, float]] = {
    "sheet_thickness": (3.8, 6.0), "gap": (2.5, 7.0), "touching": (0.15, 0.45), "waviness": (2.0, 7.0),
    "fray": (0.2, 0.8), "air": (25, 55), "papyrus": (150, 200), "noise": (10, 20), "blur": (0.6, 1.1)}
#: Style families: scrolls scanned or preserved unlike the base ones, each moving one kind of look outside
#: the base ranges. A model and a chain tuned on some families can be scored on the others (a shift).
FAMILIES: dict[str, dict[str, tuple[float, float]]] = {
    "base": {},
    "contrast": {"air": (60, 85), "papyrus": (115, 145), "blur": (1.2, 1.7)},  # a faint, soft scan
    "noise": {"noise": (26, 36)},  # a fast, noisy scan
    "spacing": {"sheet_thickness": (2.8, 3.8), "gap": (1.3, 2.6), "touching": (0.45, 0.75)},  # tightly wound
    "damage": {"fray": (0.85, 1.0), "waviness": (7.0, 11.0)},  # holed, delaminated, crumpled
}


def style_ranges(family: str) -> dict[str, tuple[float, float]]:
    if family not in FAMILIES:
        raise UserError(f"unknown style family {family!r}; one of {', '.join(FAMILIES)}.")
    return {**BASE_RANGES, **FAMILIES[family]}


# --------------------------------------------------------------------------- random fields


def _smooth_noise(shape: tuple[int, ...], sigma, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _coarse_noise(shape: Shape3, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth 3D noise with features of about ``cell`` voxels (float32, zero mean, unit std).

    White noise on a coarse grid, upsampled one axis at a time by a Gaussian-weighted matrix:
    a few small matrix products instead of a 3D spline zoom, which costs a second per volume.
    """
    field = rng.standard_normal(tuple(int(np.ceil(n / cell)) + 3 for n in shape)).astype(np.float32)
    for axis, n in enumerate(shape):
        position = np.arange(n, dtype=np.float32) / cell + 1.0  # coarse coordinate of each voxel
        weights = np.exp(-0.5 * ((position[:, None] - np.arange(field.shape[axis])[None, :]) / 0.7) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights.astype(np.float32), field, axes=(1, axis)), 0, axis)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


# --------------------------------------------------------------------------- geometry


@dataclass
class _Chunk:
    """Every voxel's place relative to the scroll, flattened and sorted by unwarped radius."""

    shape: Shape3
    order: np.ndarray  # flat voxel indices sorted by ``radius``
    radius: np.ndarray  # radius minus the shared warp, sorted (a flat sheet has constant radius)
    zi: np.ndarray  # row of the (z, s) surface grid for each voxel, in ``order``
    si: np.ndarray  # column of the (z, s) surface grid for each voxel, in ``order``
    grid: tuple[int, int]  # shape of the (z, s) surface grid
    scan_radius: np.ndarray  # distance from the scanner's rotation axis, (D, H, W), for ring artefacts

    def voxels(self, low: float, high: float) -> slice:
        """The run of sorted voxels whose unwarped radius lies in [low, high]."""
        return slice(int(np.searchsorted(self.radius, low)), int(np.searchsorted(self.radius, high, "right")))


def _chunk_coordinates(shape: Shape3, style: ScrollStyle, rng: np.random.Generator) -> _Chunk:
    depth, height, width = shape
    # The axis lies outside the chunk (beyond half its diagonal) and is slightly tilted.
    distance = rng.uniform(0.75, 2.0) * max(height, width)
    direction = rng.uniform(0, 2 * np.pi)
    tilt = rng.uniform(-0.2, 0.2, size=2)
    z = np.arange(depth, dtype=np.float32)[:, None, None] - depth / 2
    y = np.arange(height, dtype=np.float32)[None, :, None] - height / 2
    x = np.arange(width, dtype=np.float32)[None, None, :] - width / 2
    dy = y - (distance * np.sin(direction) + tilt[0] * z)
    dx = x - (distance * np.cos(direction) + tilt[1] * z)
    r = np.sqrt(dy * dy + dx * dx, dtype=np.float32)
    # Angle measured from the chunk's own direction, so it stays far from the +-pi seam.
    cos_d, sin_d = np.cos(direction + np.pi), np.sin(direction + np.pi)
    theta = np.arctan2(dy * cos_d - dx * sin_d, dx * cos_d + dy * sin_d)
    s = theta * distance  # arc length at the chunk's distance, in voxels
    si = np.rint(s - s.min()).astype(np.int32).ravel()
    zi = np.broadcast_to(np.arange(depth, dtype=np.int32)[:, None, None], shape).ravel()
    grid = (depth, int(si.max()) + 1)
    # Sheets are wavy together: a shared warp, long along the axis, subtracted from the radius.
    warp = style.waviness * _smooth_noise(grid, (22, 16), rng)
    unwarped = r.ravel() - warp[zi, si]
    order = np.argsort(unwarped, kind="stable")
    return _Chunk(shape, order, unwarped[order], zi[order], si[order], grid, r)


@dataclass
class _Sheet:
    inner: np.ndarray  # unwarped radius of the inner face on the (z, s) grid
    thickness: np.ndarray  # thickness on the (z, s) grid
    peel: np.ndarray  # how far the inner ply has come off, voxels, on the (z, s) grid
    intact: np.ndarray  # 1 where the sheet is whole, 0 in its holes, on the (z, s) grid
    texture_offset: int


def _sheets(chunk: _Chunk, style: ScrollStyle, rng: np.random.Generator) -> list[_Sheet]:
    """Sheets from inside the chunk's smallest radius to beyond its largest, in order.

    Each sheet sits at its own nominal radius plus a small deviation, so spacing varies without
    drifting; where a deviation would make it cross the previous sheet it is pressed against it.
    """
    grid = chunk.grid
    pitch = style.sheet_thickness + style.gap
    nominal = float(chunk.radius[0]) - 2 * pitch + rng.uniform(0, pitch)
    previous_outer = np.full(grid, -np.inf, np.float32)
    sheets = []
    while nominal < float(chunk.radius[-1]) + pitch:
        thickness = style.sheet_thickness * rng.uniform(0.8, 1.2) * (1 + 0.12 * _smooth_noise(grid, (10, 6), rng))
        thickness = np.maximum(thickness, 3.5)
        spread = style.gap * (0.9 if rng.random() < style.touching else 0.3)
        inner = nominal + spread * _smooth_noise(grid, (14, 10), rng)
        inner = np.maximum(inner, previous_outer)
        peel = np.clip(_smooth_noise(grid, (8, 5), rng) - (2.7 - 1.2 * style.fray), 0, None) * 3.0
        holes = _smooth_noise(grid, (3, 3), rng) + 0.7 * _smooth_noise(grid, (12, 8), rng)
        intact = np.clip((3.2 - 1.2 * style.fray - holes) * 2.0, 0, 1)
        sheets.append(_Sheet(inner, thickness, peel, intact, int(rng.integers(0, grid[1]))))
        previous_outer = inner + thickness
        nominal += style.sheet_thickness + style.gap * rng.uniform(0.6, 1.4)
    return sheets


def _fibre_textures(grid: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Papyrus fibres: along the arc on the outer ply, along the axis on the inner ply."""
    return _smooth_noise(grid, (0.6, 5), rng), _smooth_noise(grid, (5, 0.6), rng)


# --------------------------------------------------------------------------- the volume


def generate_volume(shape: Shape3, rng: np.random.Generator, style: ScrollStyle | None = None,
                    border: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One CT chunk of a scroll and its label, both uint8 of ``shape`` (D, H, W).

    ``style`` is the scroll's look (drawn from ``rng`` when omitted); ``border`` the unlabeled
    margin at every face (2-4 voxels when omitted). The same rng state gives the same volume.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise UserError(f"Volume shape {shape} is too small: give three sides (D H W) of at least 4 voxels.")
    style = style or ScrollStyle.draw(rng)
    chunk = _chunk_coordinates(shape, style, rng)
    fibres = _fibre_textures(chunk.grid, rng)
    density = np.zeros(chunk.order.size, np.float32)  # in sorted order until the end
    surface = np.zeros(chunk.order.size, bool)
    for sheet in _sheets(chunk, style, rng):
        _draw_sheet(sheet, chunk, fibres, density, surface)
    image = _scan(_unsort(density, chunk), chunk, style, rng)
    label = _label(_unsort(surface, chunk), shape, rng, border)
    return image, label


def _unsort(values: np.ndarray, chunk: _Chunk) -> np.ndarray:
    volume = np.empty_like(values)
    volume[chunk.order] = values
    return volume.reshape(chunk.shape)


def _draw_sheet(sheet: _Sheet, chunk: _Chunk, fibres: tuple[np.ndarray, np.ndarray],
                density: np.ndarray, surface: np.ndarray) -> None:
    """Add one sheet's density (max-combined, as touching sheets share voxels) and its label."""
    reach = chunk.voxels(float(sheet.inner.min() - sheet.peel.max()) - 1,
                         float((sheet.inner + sheet.thickness).max()) + 1)
    if reach.start == reach.stop:
        return
    z, s = chunk.zi[reach], chunk.si[reach]
    d = chunk.radius[reach] - sheet.inner[z, s]  # depth below the inner face
    t, peel, intact = sheet.thickness[z, s], sheet.peel[z, s], sheet.intact[z, s]
    half = t / 2
    # Partial-volume occupancy of an interval [a, b] for a voxel at d: clip(min(d-a, b-d)+0.5).
    outer_ply = np.clip(np.minimum(d - half, t - d) + 0.5, 0, 1)
    inner_ply = np.clip(np.minimum(d + peel, half - peel - d) + 0.5, 0, 1)
    s_texture = (s + sheet.texture_offset) % chunk.grid[1]
    texture = np.where(d >= half - peel / 2, fibres[0][z, s_texture], fibres[1][z, s_texture])
    occupancy = np.maximum(outer_ply, inner_ply) * intact * (1 + 0.18 * texture)
    density[reach] = np.maximum(density[reach], occupancy)
    surface[reach] |= (d >= t - LABEL_THICKNESS - 0.5) & (d <= t - 0.5) & (intact > 0.5)


def _scan(density: np.ndarray, chunk: _Chunk, style: ScrollStyle, rng: np.random.Generator) -> np.ndarray:
    """Density to CT grey levels: debris in the air, blur, drift, correlated noise, ring artefacts."""
    shape = density.shape
    debris = np.clip(_coarse_noise(shape, 3, rng) - 1.6, 0, None) * 0.25
    density = np.maximum(density, debris)
    grey = style.air + (style.papyrus - style.air) * density
    grey = ndimage.gaussian_filter(grey, style.blur)
    grey += 6.0 * _coarse_noise(shape, 24, rng)  # slow drift (beam hardening, uneven exposure)
    grey += 2.0 * np.sin(chunk.scan_radius * (2 * np.pi / rng.uniform(5, 11)) + rng.uniform(0, 2 * np.pi))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.6)
    grey += style.noise * noise / max(float(noise.std()), 1e-6)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _label(surface: np.ndarray, shape: Shape3, rng: np.random.Generator, border: int | None) -> np.ndarray:
    """0 / 1 from the sheets' surfaces, then 2 on a few unlabeled blobs and on every face's border."""
    label = surface.astype(np.uint8)
    blobs = _coarse_noise(shape, max(min(shape) / 3, 4), rng)
    share = rng.uniform(0.05, 0.45)  # how much of the volume nobody annotated
    label[blobs > np.quantile(blobs[::2, ::2, ::2], 1 - share)] = UNLABELED
    b = int(rng.integers(2, 5)) if border is None else border
    if b > 0:
        for axis in range(3):
            index = [slice(None)] * 3
            index[axis] = slice(0, b)
            label[tuple(index)] = UNLABELED
            index[axis] = slice(shape[axis] - b, None)
            label[tuple(index)] = UNLABELED
    return label


# --------------------------------------------------------------------------- the dataset


def _ids(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    """``n`` distinct numeric-looking ids, like the competition's."""
    ids: list[str] = []
    while len(ids) < n:
        candidate = str(int(rng.integers(low, high)))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _prepare_folder(out: Path) -> None:
    """Create ``out``, or clear a previously generated dataset there; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give --out a folder for the synthetic dataset.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} is not empty and was not made by `vlab data synth`; refusing to write "
                            "into it. Choose an empty or new folder for --out.")
        for name in LAYOUT_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("train.csv", "test.csv"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_dataset(out: Path, n: int = DEFAULT_N, shape: Shape3 = DEFAULT_SHAPE, seed: int = 0,
                  scrolls: int = DEFAULT_SCROLLS, n_test: int = DEFAULT_TEST, *, progress: bool = True,
                  workers: int | None = None, families: Sequence[str] = ("base",)) -> Path:
    """Write a synthetic dataset in the competition layout into ``out`` and return ``out``.

    Volume ``i`` belongs to scroll ``i % scrolls``; every volume of a scroll shares its style, drawn from
    the ranges of family ``families[k % len(families)]`` for scroll ``k``.
    The same arguments give byte-identical files, whatever ``workers`` (processes that write volumes
    at once; default one per available core, 1: this process). A folder made earlier by this function
    is replaced; any other non-empty folder is refused.
    """
    if n < 1 or n_test < 1 or scrolls < 1:
        raise UserError(f"Need at least one training volume, one test volume and one scroll "
                        f"(got n={n}, test={n_test}, scrolls={scrolls}).")
    for family in families:
        style_ranges(family)  # an unknown family is refused before anything is written
    out = Path(out)
    _prepare_folder(out)
    naming = np.random.default_rng([seed, 0])
    scroll_ids = _ids(naming, scrolls, 10_000, 99_999)
    volume_ids = _ids(naming, n + n_test, 10**8, 2**31 - 1)
    scroll_families = [families[k % len(families)] for k in range(scrolls)]
    styles = [ScrollStyle.draw(np.random.default_rng([seed, 1, k]), scroll_families[k]) for k in range(scrolls)]
    jobs = [("train", i, volume_ids[i]) for i in range(n)] + [("test", j, volume_ids[n + j]) for j in range(n_test)]
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for split, index, volume_id in jobs:
        rows[split].append(f"{volume_id},{scroll_ids[index % scrolls]}")
    tasks = [(out, split, index, volume_id, tuple(shape), seed, styles[index % scrolls])
             for split, index, volume_id in jobs]
    workers = min(len(tasks), workers or len(children.usable_cpus()))
    if workers <= 1 or len(tasks) * math.prod(shape) < POOL_VOXELS:
        for task in _track(tasks, "synthesising volumes", progress):
            _write_volume(task)
    else:
        import multiprocessing

        # spawn, not fork: the caller may run threads (torch's, a progress bar) that fork would copy mid-lock;
        # the workers end with this process (children.process_pool)
        with children.process_pool(workers, multiprocessing.get_context("spawn")) as pool:
            for _ in _track(pool.map(_write_volume, tasks), "synthesising volumes", progress, total=len(tasks)):
                pass
    for split in ("train", "test"):
        write_text_atomic(out / f"{split}.csv", "id,scroll_id\n" + "".join(row + "\n" for row in rows[split]))
    record = {"n": n, "shape": list(shape), "seed": seed, "scrolls": scrolls, "n_test": n_test,
              "styles": {scroll_ids[k]: asdict(styles[k]) for k in range(scrolls)},
              "families": {scroll_ids[k]: scroll_families[k] for k in range(scrolls)}}
    write_text_atomic(out / MARKER, json.dumps(record, indent=2) + "\n")
    return out


#: Below this many voxels in all, volumes are written in this process (a pool would cost more than it saves).
POOL_VOXELS = 1 << 24


def _write_volume(task: tuple) -> None:
    """Generate and write one volume (and its label, for training): a process of the pool runs this."""
    out, split, index, volume_id, shape, seed, style = task
    rng = np.random.default_rng([seed, 2 if split == "train" else 3, index])
    image, label = generate_volume(shape, rng, style)
    write_volume(out / f"{split}_images" / f"{volume_id}.tif", image)
    if split == "train":
        write_volume(out / "train_labels" / f"{volume_id}.tif", label)


def _track(items, description: str, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, total=total, transient=True, console=err)
