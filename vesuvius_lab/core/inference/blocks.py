"""Volumes of any size, block by block: the block plan and exact block-wise sliding windows.

The plan
--------
A :class:`BlockPlan` cuts a region of a volume (the whole volume, or a ``--bbox``) into blocks on a
grid anchored at the volume's origin: block ``(i, j, k)`` covers ``[i*b, (i+1)*b)`` along each axis,
clipped to the region. ``b`` is a multiple of the output's chunk (and shard), so no two blocks ever
write one chunk: blocks are independent items that any number of processes or machines can take
(part of one job each, in any order), each recorded done on its own.

Exact blocks
------------
:func:`predict_block` gives, for a block's *core*, exactly what :func:`~vesuvius_lab.core.inference.
engine.sliding_window` gives for the same voxels over the whole volume: it lays out the whole
volume's window grid (anchored at the origin, the last window flush with the far edge, zero padding
where the volume is shorter than the window), keeps the windows that touch the core, in the same
order, reads the region they cover (core plus a halo of at most a window's side) with zeros beyond
the volume, and blends them with the same arithmetic; TTA and 2.5D axes as the engine does them.
No logits are stored anywhere: a block's probabilities exist only while it is written.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import numpy as np

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference import engine

if TYPE_CHECKING:
    import torch

Shape3 = tuple[int, int, int]


# --------------------------------------------------------------------------- boxes


@dataclass(frozen=True)
class Box:
    """A half-open box of global voxel coordinates, ``start <= voxel < stop`` along (z, y, x)."""

    start: Shape3
    stop: Shape3

    @classmethod
    def of_shape(cls, shape: Sequence[int]) -> "Box":
        return cls((0, 0, 0), tuple(int(n) for n in shape))  # type: ignore[arg-type]

    @property
    def shape(self) -> Shape3:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return math.prod(max(n, 0) for n in self.shape)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def grow(self, halo: int, within: "Box") -> "Box":
        """The box extended by ``halo`` voxels on every side, clipped to ``within``."""
        return Box(tuple(max(a - halo, w) for a, w in zip(self.start, within.start)),  # type: ignore[arg-type]
                   tuple(min(b + halo, w) for b, w in zip(self.stop, within.stop)))

    def relative_to(self, outer: "Box") -> tuple[slice, slice, slice]:
        """This box's slices inside an array holding ``outer``."""
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, outer.start))  # type: ignore

    def contains(self, other: "Box") -> bool:
        return all(a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop))

    def to_json(self) -> list[list[int]]:
        return [list(self.start), list(self.stop)]

    @classmethod
    def from_json(cls, value: Sequence[Sequence[int]]) -> "Box":
        return cls(tuple(int(v) for v in value[0]), tuple(int(v) for v in value[1]))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return ",".join(f"{a}:{b}" for a, b in zip(self.start, self.stop))


def parse_bbox(text: str, shape: Sequence[int]) -> Box:
    """``z0:z1,y0:y1,x0:x1`` in global voxel coordinates (an empty bound is the volume's edge)."""
    parts = text.replace(" ", "").split(",")
    if len(parts) != 3 or any(part.count(":") != 1 for part in parts):
        raise UserError(f"--bbox {text}: give three ranges z0:z1,y0:y1,x0:x1 in voxels of the volume "
                        f"{tuple(shape)}, e.g. 0:512,1000:1512,1000:1512 (an empty bound is the volume's edge).")
    start, stop = [], []
    for axis, (part, size) in enumerate(zip(parts, shape)):
        low, high = part.split(":")
        try:
            lo, hi = int(low) if low else 0, int(high) if high else int(size)
        except ValueError:
            raise UserError(f"--bbox {text}: {'zyx'[axis]} range {part!r} is not two whole numbers.") from None
        if not 0 <= lo < hi <= size:
            raise UserError(f"--bbox {text}: the {'zyx'[axis]} range {lo}:{hi} is not inside the volume, whose "
                            f"{'zyx'[axis]} side is {size} (shape {tuple(shape)}); give 0 <= start < stop <= {size}.")
        start.append(lo)
        stop.append(hi)
    return Box(tuple(start), tuple(stop))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the block plan


@dataclass(frozen=True)
class Block:
    index: Shape3  # position on the block grid
    core: Box  # the voxels this block writes

    @property
    def name(self) -> str:
        return "_".join(str(i) for i in self.index)


@dataclass(frozen=True)
class BlockPlan:
    """The blocks of ``region`` on a grid of side ``block`` anchored at the volume's origin."""

    volume_shape: Shape3
    region: Box
    block: Shape3

    def __post_init__(self):
        if any(b < 1 for b in self.block):
            raise UserError(f"--block {self.block}: give a positive side.")
        if not Box.of_shape(self.volume_shape).contains(self.region):
            raise ValueError(f"region {self.region} is outside the volume {self.volume_shape}")

    def grid(self) -> list[range]:
        """The block indices along each axis that the region touches."""
        return [range(a // b, -(-c // b)) for a, c, b in zip(self.region.start, self.region.stop, self.block)]

    def __len__(self) -> int:
        return math.prod(len(r) for r in self.grid())

    def blocks(self) -> Iterator[Block]:
        """Every block, in C order (z slowest), its core clipped to the region."""
        for index in itertools.product(*self.grid()):
            start = tuple(max(i * b, r) for i, b, r in zip(index, self.block, self.region.start))
            stop = tuple(min((i + 1) * b, r) for i, b, r in zip(index, self.block, self.region.stop))
            yield Block(tuple(index), Box(start, stop))  # type: ignore[arg-type]

    def to_json(self) -> dict:
        return {"volume_shape": list(self.volume_shape), "region": self.region.to_json(), "block": list(self.block)}


# --------------------------------------------------------------------------- reading


class Reader(Protocol):
    """What a block reads from: a shape, a dtype and zero-filled boxes (a :class:`~vesuvius_lab.core.data.
    volumes.VolumeSource`, or :class:`ArrayReader` for a volume in memory)."""

    shape: Shape3
    dtype: Any

    def read(self, box: tuple[slice, slice, slice]) -> np.ndarray: ...


class ArrayReader:
    """A (D, H, W) array in memory as a :class:`Reader`."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)
        self.shape, self.dtype = tuple(self.array.shape), self.array.dtype

    def read(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        return read_zero_filled(self.array, box)


def read_zero_filled(array: Any, box: tuple[slice, slice, slice]) -> np.ndarray:
    """``array[box]`` for any array-like with numpy indexing, zeros where the box leaves the array."""
    inside = tuple(slice(max(s.start, 0), min(s.stop, n)) for s, n in zip(box, array.shape))
    shape = tuple(s.stop - s.start for s in box)
    if all(i.start == s.start and i.stop == s.stop for i, s in zip(inside, box)):
        return np.asarray(array[inside])
    out = np.zeros(shape, dtype=array.dtype)
    if all(i.stop > i.start for i in inside):
        out[tuple(slice(i.start - s.start, i.stop - s.start) for i, s in zip(inside, box))] = array[inside]
    return out


# --------------------------------------------------------------------------- exact blocks


@dataclass(frozen=True)
class WindowSettings:
    """The engine's settings for one model, checked once."""

    window: Shape3
    overlap: tuple[float, float, float]
    blender: str
    blender_params: Any
    batch_size: int
    tta: tuple[str, ...]
    axes: tuple[int, ...]

    @classmethod
    def of(cls, inference: Any, window: Sequence[int] | None = None) -> "WindowSettings":
        window = engine._check_window(window or inference.window)
        return cls(window, engine._check_overlap(inference.overlap), inference.blend.plugin, inference.blend.params,
                   int(inference.batch_size), tuple(engine._check_tta(inference.tta, window)),
                   engine._check_axes(getattr(inference, "axes", (0,))))


def _touching(starts: list[int], side: int, low: int, high: int) -> list[int]:
    """The window starts along one axis whose window [s, s + side) meets [low, high)."""
    return [s for s in starts if s < high and s + side > low]


def _one_axis(reader: Reader, core: Box, order: Shape3, predictor, settings: WindowSettings,
              weights: "torch.Tensor", variants, scale: float, device) -> "torch.Tensor":
    """Blended predictions (C, *core in ``order``) of one depth axis: the windows of the whole (permuted)
    volume's grid that touch the core, over the region they cover."""
    import torch

    shape = tuple(reader.shape[a] for a in order)
    window = settings.window
    pads = engine.padding(shape, window)
    padded = [n + before + after for n, (before, after) in zip(shape, pads)]
    lows = [core.start[a] + before for a, (before, _) in zip(order, pads)]
    highs = [core.stop[a] + before for a, (before, _) in zip(order, pads)]
    starts = [_touching(engine.window_starts(n, w, o), w, lo, hi)
              for n, w, o, lo, hi in zip(padded, window, settings.overlap, lows, highs)]
    region_lo = [min(s) for s in starts]
    region_hi = [max(s) + w for s, w in zip(starts, window)]
    # The region in the volume's own axis order and coordinates (padding is zeros, as beyond the volume).
    box = [slice(0, 0)] * 3
    for axis_in_order, axis in enumerate(order):
        before = pads[axis_in_order][0]
        box[axis] = slice(region_lo[axis_in_order] - before, region_hi[axis_in_order] - before)
    data = np.ascontiguousarray(reader.read(tuple(box)).transpose(order))
    volume = engine._as_tensor(data, device)
    windows = [tuple(slice(s - lo, s - lo + w) for s, lo, w in zip(corner, region_lo, window))
               for corner in itertools.product(*starts)]
    blended, weight_sum = engine._accumulate(volume, windows, predictor, window=window, weights=weights,
                                             batch_size=settings.batch_size, variants=variants, scale=scale,
                                             advance=lambda: None)
    inner = tuple(slice(lo - rlo, hi - rlo) for lo, hi, rlo in zip(lows, highs, region_lo))
    result = blended[(slice(None), *inner)] / weight_sum[inner]
    return result.permute(0, *(1 + order.index(a) for a in range(3)))  # back to (C, z, y, x)


def predict_block(reader: Reader, core: Box, predictor, inference: Any, *, window: Sequence[int] | None = None,
                  device: Any = None) -> np.ndarray:
    """Surface probabilities float32 of ``core`` (its shape), equal to :func:`engine.predict_volume` of the
    whole volume there, for a logits model and the run's ``[inference]`` (``window`` overrides its window)."""
    import torch

    settings = WindowSettings.of(inference, window)
    dtype = np.dtype(reader.dtype)
    if dtype == np.uint8:
        scale = 1 / 255
    elif dtype.kind == "f":
        scale = 1.0
    else:
        raise UserError(f"Volumes to predict are uint8 CT (or floats already scaled to [0, 1]); got {dtype}.")
    device = torch.device(device) if device is not None else engine._default_device(predictor, None)
    weights = engine.weight_map(settings.blender, settings.blender_params, settings.window, device)
    variants = engine._tta_variants(settings.tta)
    probabilities = engine._probabilities(predictor)
    with engine._eval_mode(predictor), torch.inference_mode():
        total = None
        for axis in settings.axes:
            order = (axis, *(a for a in range(3) if a != axis))
            result = _one_axis(reader, core, order, probabilities, settings, weights, variants, scale, device)
            total = result if total is None else total + result
        if len(settings.axes) > 1:
            total /= len(settings.axes)
        return total[0].contiguous().cpu().numpy()


def halo_windows(core: Box, shape: Sequence[int], inference: Any, window: Sequence[int] | None = None) -> int:
    """How many windows one block predicts (every axis pass): the compute a block costs, halos included."""
    settings = WindowSettings.of(inference, window)
    count = 0
    for axis in settings.axes:
        order = (axis, *(a for a in range(3) if a != axis))
        permuted = [shape[a] for a in order]
        pads = engine.padding(permuted, settings.window)
        sides = []
        for i, a in enumerate(order):
            size = permuted[i] + sum(pads[i])
            starts = engine.window_starts(size, settings.window[i], settings.overlap[i])
            sides.append(len(_touching(starts, settings.window[i], core.start[a] + pads[i][0],
                                       core.stop[a] + pads[i][0])))
        count += math.prod(sides)
    return count * len(engine._tta_variants(settings.tta))
