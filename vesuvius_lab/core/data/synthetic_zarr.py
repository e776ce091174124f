"""A synthetic whole scroll as an OME-Zarr volume of any size, written block by block.

The scroll is a cylinder around the z axis (slightly tilted) in air (0): inside, one papyrus sheet
rolled as an Archimedean spiral in the (y, x) plane, ``r = r0 + pitch * turn``, a few voxels thick,
gently warped along z, over a darker packing between the turns. Grey levels follow
:mod:`vesuvius_lab.core.data.synthetic` (the volumes the models are trained on): a scroll style drawn
from the same ranges gives the packing and papyrus levels, blur, noise, a slow drift and faint rings.

Every voxel is a closed-form function of its global coordinates and the seeded parameters (noise
comes from a hash of the coordinates; blur and correlated noise are filters computed over a halo
that covers their whole reach), so a block is computed on its own, any block can be regenerated,
and the result does not depend on the block size. Memory depends on the block, never on the volume.

The label (0 background, 1 the sheet's outer surface layer, as in the training data) is an NGFF label
image, ``OUT.zarr/labels/surface``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from vesuvius_lab.core.console import err
from vesuvius_lab.core.data.ome_output import OmeZarrOutput, add_label_image, aligned_blocks
from vesuvius_lab.core.data.synthetic import LABEL_THICKNESS, ScrollStyle
from vesuvius_lab.core.errors import UserError

Shape3 = tuple[int, int, int]
LABEL_NAME = "surface"
MARKER = "synthetic_scroll"  # key of the image's "vesuvius_lab" attributes: a volume this module wrote
#: Voxels written at once: a block is whole chunks (shards) grown up to this.
BLOCK_VOXELS = 2 ** 21
#: Voxels rendered at once within a block (its temporaries are the memory that matters).
RENDER_VOXELS = 2 ** 20
_HALO = 5  # covers the blur (sigma <= 1.1, truncated at 4 sigma) and the noise filter (sigma 0.6)
_NOISE_SIGMA = 0.6


@dataclass(frozen=True)
class ScrollGeometry:
    """Where the sheet is: the seeded parameters of the closed form."""

    centre: tuple[float, float]  # (y, x) of the axis at z = 0
    tilt: tuple[float, float]  # axis shift in (y, x) per voxel of z
    radius: float  # the scroll's outer radius; air beyond
    core: float  # radius where the spiral starts
    pitch: float  # radial distance between turns
    thickness: float  # mean sheet thickness
    warp: tuple[float, ...]  # amplitude, wavelength_1, phase_1, wavelength_2, phase_2
    thickness_wave: tuple[float, float]  # wavelength, phase
    drift: tuple[tuple[float, ...], ...]  # (ky, kx, kz, phase) per slow drift wave
    ring_period: float
    ring_phase: float
    noise_key: int

    @classmethod
    def draw(cls, shape: Shape3, style: ScrollStyle, rng: np.random.Generator) -> "ScrollGeometry":
        depth, height, width = shape
        side = min(height, width)
        # The axis moves by at most 3% of the side over the depth, and the scroll fills 84% of the side:
        # the corners of every slice stay air.
        shift = rng.uniform(-0.03, 0.03, size=2) * side / max(depth - 1, 1)
        centre = ((height - 1) / 2 - shift[0] * (depth - 1) / 2, (width - 1) / 2 - shift[1] * (depth - 1) / 2)
        radius = 0.42 * side
        waves = []
        for _ in range(3):
            direction = rng.normal(size=3)
            direction *= 2 * np.pi / (np.linalg.norm(direction) * rng.uniform(24, 60))
            waves.append((*map(float, direction), float(rng.uniform(0, 2 * np.pi))))
        return cls(centre=(float(centre[0]), float(centre[1])), tilt=(float(shift[0]), float(shift[1])),
                   radius=float(radius), core=float(rng.uniform(0.05, 0.12) * side),
                   pitch=float(style.sheet_thickness + style.gap), thickness=float(style.sheet_thickness),
                   warp=(float(style.waviness * 0.5), float(rng.uniform(60, 200)), float(rng.uniform(0, 2 * np.pi)),
                         float(rng.uniform(80, 300)), float(rng.uniform(0, 2 * np.pi))),
                   thickness_wave=(float(rng.uniform(40, 120)), float(rng.uniform(0, 2 * np.pi))),
                   drift=tuple(waves), ring_period=float(rng.uniform(5, 11)),
                   ring_phase=float(rng.uniform(0, 2 * np.pi)), noise_key=int(rng.integers(1, 2 ** 62)))

    def outside(self, box: tuple[slice, slice, slice]) -> bool:
        """Whether every voxel of ``box`` lies beyond the scroll's radius (so the block is all air: 0)."""
        middle = (box[0].start + box[0].stop - 1) / 2
        axis_y, axis_x = self.centre[0] + self.tilt[0] * middle, self.centre[1] + self.tilt[1] * middle
        near_y = min(max(axis_y, box[1].start), box[1].stop - 1) - axis_y
        near_x = min(max(axis_x, box[2].start), box[2].stop - 1) - axis_x
        # The axis moves by at most hypot(tilt) per voxel of z away from the middle slice.
        reach = math.hypot(*self.tilt) * (box[0].stop - box[0].start) / 2
        return math.hypot(near_y, near_x) - reach > self.radius + 0.5


# --------------------------------------------------------------------------- one block, closed form


def _hashed_normal(z: np.ndarray, y: np.ndarray, x: np.ndarray, key: int) -> np.ndarray:
    """Unit-variance noise per voxel from a hash of its global coordinates (splitmix64; float32)."""
    def field(values: np.ndarray) -> np.ndarray:  # 21 bits per coordinate; halo coordinates are negative
        return (values + np.float32(1 << 20)).astype(np.uint64)

    with np.errstate(over="ignore"):
        h = (field(z) << np.uint64(42)) | (field(y) << np.uint64(21)) | field(x)
        h = h + np.uint64(key)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    total = np.zeros(h.shape, np.float32)
    for part in range(4):  # the sum of four uniforms: close enough to a normal, and cheap
        total += ((h >> np.uint64(16 * part)) & np.uint64(0xFFFF)).astype(np.float32)
    return (total / 65536.0 - 2.0) * np.float32(math.sqrt(3.0))


def _filtered_noise_std(sigma: float) -> float:
    """The standard deviation of unit white noise after scipy's 3D Gaussian filter of ``sigma``."""
    impulse = np.zeros(33)
    impulse[16] = 1.0
    weights = ndimage.gaussian_filter1d(impulse, sigma)
    return float(np.sum(weights ** 2) ** 1.5)


def render_block(box: tuple[slice, slice, slice], style: ScrollStyle,
                 geometry: ScrollGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The image (uint8) and label (uint8 0/1) of ``box`` (global coordinates), from the closed form."""
    halo = _HALO
    z = np.arange(box[0].start - halo, box[0].stop + halo, dtype=np.float32)[:, None, None]
    y = np.arange(box[1].start - halo, box[1].stop + halo, dtype=np.float32)[None, :, None]
    x = np.arange(box[2].start - halo, box[2].stop + halo, dtype=np.float32)[None, None, :]
    dy = y - (np.float32(geometry.centre[0]) + np.float32(geometry.tilt[0]) * z)
    dx = x - (np.float32(geometry.centre[1]) + np.float32(geometry.tilt[1]) * z)
    r = np.sqrt(dy * dy + dx * dx)
    theta = np.arctan2(dy, dx)
    amplitude, wave_1, phase_1, wave_2, phase_2 = geometry.warp
    warp = amplitude * (0.6 * np.sin(2 * np.pi * z / wave_1 + phase_1 + theta)
                        + 0.4 * np.sin(2 * np.pi * z / wave_2 + phase_2 + 2 * theta))
    thickness = geometry.thickness * (1 + 0.12 * np.sin(2 * np.pi * z / geometry.thickness_wave[0]
                                                        + geometry.thickness_wave[1] + 3 * theta))
    # Turn coordinate: the spiral's inner face at angle theta is at r0 + pitch * (turn + theta / 2 pi).
    turn = (r - warp - geometry.core) / geometry.pitch - theta / (2 * np.pi)
    index = np.floor(turn)
    depth = (turn - index) * geometry.pitch  # below the inner face of this turn's sheet, [0, pitch)
    inside = (r <= geometry.radius) & (index >= 0)
    # Partial-volume occupancy of [0, thickness] (and of the previous turn's sheet, for depth near pitch).
    occupancy = np.clip(np.maximum(np.minimum(depth, thickness - depth),
                                   np.minimum(depth - geometry.pitch, thickness - depth + geometry.pitch)) + 0.5, 0, 1)
    density = np.where(inside, occupancy, 0).astype(np.float32)
    label = inside & (depth >= thickness - LABEL_THICKNESS - 0.5) & (depth <= thickness - 0.5) & \
        (r <= geometry.radius - 1)
    grey = style.air + (style.papyrus - style.air) * ndimage.gaussian_filter(density, style.blur)
    for ky, kx, kz, phase in geometry.drift:
        grey += 6.0 / math.sqrt(len(geometry.drift) / 2) * np.sin(ky * y + kx * x + kz * z + phase)
    grey += 2.0 * np.sin(r * (2 * np.pi / geometry.ring_period) + geometry.ring_phase)
    noise = ndimage.gaussian_filter(_hashed_normal(z, y, x, geometry.noise_key), _NOISE_SIGMA)
    grey += style.noise / _filtered_noise_std(_NOISE_SIGMA) * noise
    image = np.where(r <= geometry.radius, np.clip(np.rint(grey), 0, 255), 0).astype(np.uint8)
    core = (slice(halo, -halo),) * 3
    return image[core], label[core].astype(np.uint8)


# --------------------------------------------------------------------------- the volume


def scroll_parameters(shape: Shape3, seed: int) -> tuple[ScrollStyle, ScrollGeometry]:
    """The seeded style and geometry of the scroll of ``shape``."""
    rng = np.random.default_rng([seed, 7])
    style = ScrollStyle.draw(rng)
    return style, ScrollGeometry.draw(shape, style, rng)


def write_scroll_zarr(path: Path, shape: Shape3, *, seed: int = 0, chunks: Shape3 = (128, 128, 128),
                      zarr_format: int = 2, shard: Shape3 | None = None, progress: bool = True,
                      block_voxels: int = BLOCK_VOXELS) -> Path:
    """Write a synthetic scroll (uint8 OME-Zarr image at ``path``, label image ``path/labels/surface``),
    block by block; returns ``path``. The same seed and shape give the same voxels whatever the chunks.
    Blocks are whole chunks (shards) grown up to ``block_voxels``; memory depends on them, not on the
    volume. A volume this function wrote earlier at ``path`` is replaced; anything else there is refused."""
    path = Path(path)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise UserError(f"Volume shape {shape} is too small: give three sides (D H W) of at least 4 voxels.")
    _clear_previous(path)
    style, geometry = scroll_parameters(shape, seed)
    record = {"seed": seed, "shape": list(shape), "style": asdict(style), "geometry": asdict(geometry),
              "complete": False}
    image = OmeZarrOutput.create(path, shape=shape, chunks=chunks, zarr_format=zarr_format, shard=shard,
                                 attrs={MARKER: record}, name="synthetic scroll")
    label = add_label_image(image, LABEL_NAME, colors={1: [255, 64, 0, 255]}, attrs={MARKER: {"seed": seed}})
    blocks = list(aligned_blocks(shape, image.write_unit, block_voxels))
    for box in _track(blocks, f"writing {path.name}", progress):
        if geometry.outside(box):
            continue  # all air: nothing is stored
        voxels, surface = _render_in_slabs(box, style, geometry)
        image.write(box, voxels)
        label.write(box, surface)
    image.update_attrs(**{MARKER: {**record, "complete": True}})
    return path


def _render_in_slabs(box: tuple[slice, slice, slice], style: ScrollStyle,
                     geometry: ScrollGeometry) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_block` of ``box`` computed a z-slab of at most RENDER_VOXELS at a time: the closed form
    gives the same voxels, with a fraction of the temporaries (about 100 bytes per voxel)."""
    size = tuple(s.stop - s.start for s in box)
    image, label = np.empty(size, np.uint8), np.empty(size, np.uint8)
    step = max(16, RENDER_VOXELS // (size[1] * size[2]))
    for z in range(box[0].start, box[0].stop, step):
        slab = (slice(z, min(z + step, box[0].stop)), box[1], box[2])
        rows = slice(z - box[0].start, slab[0].stop - box[0].start)
        image[rows], label[rows] = render_block(slab, style, geometry)
    return image, label


def stored_chunks(path: Path) -> tuple[int, int]:
    """(stored, all): the chunk (shard) files the image's level 0 holds, and how many the grid has; the
    difference is the blocks of air, never stored."""
    image = OmeZarrOutput.open(path)
    grid = math.prod(-(-n // u) for n, u in zip(image.shape, image.write_unit))
    names = {".zarray", ".zattrs", "zarr.json"}
    stored = sum(1 for item in (Path(path) / "0").rglob("*") if item.is_file() and item.name not in names)
    return stored, grid


def _clear_previous(path: Path) -> None:
    """Remove a volume this module wrote earlier at ``path``; refuse anything else there."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        previous = OmeZarrOutput.open(path).attrs
    except (UserError, OSError):  # not ours, whatever it is
        previous = {}
    if MARKER not in previous:
        raise UserError(f"{path}: exists and was not written by `vlab data synth --zarr`; refusing to replace "
                        "it. Choose a new path.")
    shutil.rmtree(path)


def _track(items: list, description: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True, console=err)
