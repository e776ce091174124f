"""Writing predictions of any size: an OME-Zarr image written block by block, and its pyramid.

An output is an OME-Zarr image group: NGFF 0.4 (``multiscales`` in ``.zattrs``) for zarr format 2,
NGFF 0.5 (``ome`` in ``zarr.json``'s attributes) for zarr format 3, optionally sharded. Level 0 is the
array ``"0"`` (uint8, fill 0); :meth:`OmeZarrOutput.build_pyramid` adds levels ``"1"``, ``"2"``, ... .
Chunks that are all zero are never stored (a chunk that becomes all zero is deleted), so the air
around a scroll costs no disk. Provenance goes under the group attribute ``"vesuvius_lab"``.

Chunk files are written by zarr's local store through a temporary file and a rename, so a killed
writer leaves whole chunks; several processes may write disjoint, chunk-aligned boxes at the same
time. Attributes (:meth:`OmeZarrOutput.update_attrs`) are read-modify-write: change them from one
process at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vesuvius_lab.core.console import err
from vesuvius_lab.core.data.volumes import Box, Shape3, translated_errors
from vesuvius_lab.core.errors import UserError, absence
from vesuvius_lab.core.files import write_text_atomic

ATTRS_KEY = "vesuvius_lab"
AXES = [{"name": "z", "type": "space"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
REDUCTIONS = ("max", "mean")
#: Voxels of one pyramid step computed at once (the source region read is 8x this): bounds memory.
PYRAMID_BLOCK_VOXELS = 2 ** 21


def _compressor(zarr_format: int):
    """Blosc/zstd: read by zarr-python, tensorstore, z5 (VC3D) and neuroglancer alike."""
    if zarr_format == 2:
        import numcodecs

        return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _triple(name: str, values, kind=int, positive: bool = True) -> tuple:
    try:
        triple = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in triple):
        need = "positive " if positive else "finite "
        raise UserError(f"the output's {name} must be three {need}numbers (z, y, x), got {values!r}.")
    return triple


def array_options(zarr_format: int) -> dict[str, Any]:
    """How every array of an output is stored: Blosc-zstd, fill 0, all-zero chunks never stored; zarr v2
    keys with a folder per z (no huge folders), zarr v3 axes named."""
    options: dict[str, Any] = {"compressors": _compressor(zarr_format), "fill_value": 0,
                               "config": {"write_empty_chunks": False}}
    if zarr_format == 2:
        options["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    else:
        options["dimension_names"] = ["z", "y", "x"]
    return options


# --------------------------------------------------------------------------- NGFF metadata


def multiscale_metadata(levels: int, scale, translation, *, name: str = "image",
                        reduce: str | None = None) -> dict:
    """One NGFF ``multiscales`` entry (without "version") for levels 0..levels.

    Level ``k`` has scale ``2**k * scale``, and translation ``translation + scale * (2**k - 1) / 2``:
    the half-voxel shift that puts a downsampled voxel's centre at the centre of the level-0 voxels it
    summarises, so that all levels overlay in physical space.
    """
    datasets = []
    for k in range(levels + 1):
        factor = 2 ** k
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(s * factor) for s in scale]},
            {"type": "translation", "translation": [float(t + s * (factor - 1) / 2)
                                                    for s, t in zip(scale, translation)]}]})
    entry: dict[str, Any] = {"name": name, "axes": AXES, "datasets": datasets}
    if reduce is not None:
        entry["type"] = reduce
        entry["metadata"] = {"description": f"each level is the {reduce} of 2x2x2 voxels of the one before",
                             "method": f"numpy {reduce}", "half_voxel_shift": True}
    return entry


def _with_multiscale(attrs: dict, zarr_format: int, entry: dict) -> dict:
    """Group attributes with ``entry`` as the image's only multiscale, in the NGFF version of the format."""
    attrs = dict(attrs)
    if zarr_format == 2:
        attrs["multiscales"] = [{"version": "0.4", **entry}]
    else:
        attrs["ome"] = {**attrs.get("ome", {}), "version": "0.5", "multiscales": [entry]}
    return attrs


def _multiscale(attrs: dict) -> dict | None:
    ome = attrs.get("ome")
    multiscales = (ome.get("multiscales") if isinstance(ome, dict) else None) or attrs.get("multiscales")
    return multiscales[0] if isinstance(multiscales, list) and multiscales and isinstance(multiscales[0], dict) \
        else None


def _jsonable(value):
    """Numpy scalars, arrays, tuples and paths as plain JSON values."""
    def default(item):
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, np.ndarray):
            return item.tolist()
        if isinstance(item, Path):
            return str(item)
        raise TypeError(f"{type(item).__name__} is not JSON-serialisable")

    return json.loads(json.dumps(value, default=default))


# --------------------------------------------------------------------------- blocks


def aligned_blocks(shape: Shape3, unit: Shape3, max_voxels: int = PYRAMID_BLOCK_VOXELS) -> Iterator[Box]:
    """Boxes that tile ``shape`` in row-major order, each a whole number of ``unit`` (a chunk or shard) per
    axis (cut at the far edge), grown along x, then y, then z while the box holds at most ``max_voxels``
    (a box is never smaller than one unit)."""
    block = list(unit)
    for axis in (2, 1, 0):
        while block[axis] < shape[axis] and math.prod(block) * 2 <= max_voxels:
            block[axis] = min(block[axis] * 2, -(-shape[axis] // unit[axis]) * unit[axis])
    for z in range(0, shape[0], block[0]):
        for y in range(0, shape[1], block[1]):
            for x in range(0, shape[2], block[2]):
                yield (slice(z, min(z + block[0], shape[0])), slice(y, min(y + block[1], shape[1])),
                       slice(x, min(x + block[2], shape[2])))


def downsample2(block: np.ndarray, reduce: str) -> np.ndarray:
    """Each 2x2x2 group of voxels to one (an odd side's last voxel stands alone): "max", or "mean" over the
    voxels present rounded half up (integers)."""
    pad = [(0, n % 2) for n in block.shape]
    d, h, w = ((n + 1) // 2 for n in block.shape)
    if reduce == "max":
        padded = np.pad(block, pad)  # zero padding is neutral: voxels are unsigned
        return padded.reshape(d, 2, h, 2, w, 2).max(axis=(1, 3, 5))
    totals = np.pad(block.astype(np.uint32), pad).reshape(d, 2, h, 2, w, 2).sum(axis=(1, 3, 5))
    counts = np.ones((d, h, w), np.uint32)
    for axis, n in enumerate(block.shape):
        per_axis = np.full((n + 1) // 2, 2, np.uint32)
        per_axis[-1] = 2 - n % 2
        counts = counts * per_axis.reshape([-1 if a == axis else 1 for a in range(3)])
    return ((totals + counts // 2) // counts).astype(block.dtype)


# --------------------------------------------------------------------------- the output


class OmeZarrOutput:
    """An OME-Zarr image (uint8) written box by box; see the module's docstring."""

    def __init__(self, path: Path, group, array):
        self.path, self._group, self._array = Path(path), group, array

    # ---------------------------------------------------------------- creating and opening

    @classmethod
    def create(cls, path: Path, *, shape, chunks=(128, 128, 128), zarr_format: int = 2,
               shard: tuple[int, int, int] | None = None, scale=(1.0, 1.0, 1.0),
               translation=(0.0, 0.0, 0.0), attrs: dict | None = None, name: str | None = None) -> "OmeZarrOutput":
        """A new OME-Zarr (NGFF 0.4 for zarr v2; NGFF 0.5 for v3) image group with level 0 ``"0"``: uint8,
        fill 0, all-zero chunks never stored; ``attrs`` go into the group's attributes under "vesuvius_lab"
        (provenance). ``shard`` (zarr v3 only) is a multiple of ``chunks``: chunks inside shards. Refuses
        (UserError) if the path exists."""
        import zarr

        path = Path(path)
        shape = _triple("shape", shape)
        chunks = _triple("chunks", chunks)
        scale = _triple("scale", scale, float)
        translation = _triple("translation", translation, float, positive=False)
        if zarr_format not in (2, 3):
            raise UserError(f"{path}: zarr format {zarr_format!r} does not exist; use 2 (the default) or 3.")
        if shard is not None:
            shard = _triple("shard", shard)
            if zarr_format != 3:
                raise UserError(f"{path}: sharding needs zarr format 3; give zarr_format=3 or no shard.")
            if any(s % c for s, c in zip(shard, chunks)):
                raise UserError(f"{path}: the shard {shard} must be a whole number of chunks {chunks} on every axis.")
        if path.exists() or path.is_symlink():
            raise UserError(f"{path}: exists already; an output is never overwritten. Remove it, choose another "
                            "path, or continue the existing output.")
        entry = multiscale_metadata(0, scale, translation, name=name or path.stem)
        group_attrs = _with_multiscale({ATTRS_KEY: _jsonable(attrs or {})}, zarr_format, entry)
        group = zarr.open_group(path, mode="w-", zarr_format=zarr_format, attributes=group_attrs)
        array = cls._create_level(group, "0", shape, chunks, shard, zarr_format)
        return cls(path, group, array)

    @staticmethod
    def _create_level(group, name: str, shape: Shape3, chunks: Shape3, shard: Shape3 | None, zarr_format: int):
        return group.create_array(name, shape=shape, chunks=chunks, shards=shard, dtype="uint8", overwrite=True,
                                  **array_options(zarr_format))

    @classmethod
    def open(cls, path: Path) -> "OmeZarrOutput":
        """An existing output, opened read-write, never truncating anything."""
        import zarr
        import zarr.errors

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: output folder {absence(path, 'folder')}. Create it first (a new prediction "
                            "creates it).")
        group = entry = array = None
        with translated_errors(str(path), metadata=True):
            try:
                group = zarr.open(path, mode="r+")
            except zarr.errors.NodeNotFoundError:  # no zarr at all: said below
                pass
            if isinstance(group, zarr.Group):
                entry = _multiscale(group.attrs.asdict())
                array = group.get("0") if entry is not None else None
        if entry is None or not isinstance(array, zarr.Array) or array.ndim != 3 or array.dtype != np.uint8:
            raise UserError(f"{path}: not an output of vlab: an OME-Zarr image group with a uint8 3D level '0' was "
                            "expected. Give the output folder of a prediction, or a new path.")
        return cls(path, group, array.with_config({"write_empty_chunks": False}))

    # ---------------------------------------------------------------- what it is

    @property
    def shape(self) -> Shape3:
        return tuple(int(n) for n in self._array.shape)

    @property
    def chunks(self) -> Shape3:
        return tuple(int(n) for n in self._array.chunks)

    @property
    def level0(self):
        """The zarr array of level 0 (for writers that take a zarr array, such as dask's store)."""
        return self._array

    @property
    def shard(self) -> Shape3 | None:
        shards = getattr(self._array, "shards", None)
        return tuple(int(n) for n in shards) if shards else None

    @property
    def zarr_format(self) -> int:
        return int(self._group.metadata.zarr_format)

    @property
    def write_unit(self) -> Shape3:
        """What a written box's edges align to: the shard when sharded, else the chunk."""
        return self.shard or self.chunks

    @property
    def attrs(self) -> dict:
        """The "vesuvius_lab" attributes (provenance), as stored."""
        return dict(self._group.attrs.asdict().get(ATTRS_KEY) or {})

    @property
    def levels(self) -> int:
        """How many levels the multiscales metadata lists (1 before a pyramid is built)."""
        return len(_multiscale(self._group.attrs.asdict())["datasets"])

    def _level0_transform(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        transforms = _multiscale(self._group.attrs.asdict())["datasets"][0]["coordinateTransformations"]
        scale = next(t["scale"] for t in transforms if t["type"] == "scale")
        translation = next((t["translation"] for t in transforms if t["type"] == "translation"), [0.0] * 3)
        return tuple(scale), tuple(translation)

    def update_attrs(self, **values) -> None:
        """Merge ``values`` into the "vesuvius_lab" attributes (one process at a time)."""
        merged = {**self.attrs, **_jsonable(values)}
        self._group.attrs.update({ATTRS_KEY: merged})

    # ---------------------------------------------------------------- writing

    def write(self, box: Box, data: np.ndarray) -> None:
        """Write uint8 data at box (global coordinates). A box whose edges are off the chunk (shard) grid
        rewrites the chunks it cuts (read, modify, write): the caller makes sure no other process writes
        them meanwhile (a block plan keeps every chunk inside one block). Chunks that are all zero are not
        stored (and a chunk that was stored and is now all zero is deleted)."""
        self._check_box(box, data)
        self._array[tuple(box)] = data if data.dtype == np.uint8 else data.astype(np.uint8)

    def _check_box(self, box: Box, data: np.ndarray) -> None:
        shape = self.shape
        if len(box) != 3 or not all(isinstance(s, slice) and s.step in (None, 1) for s in box):
            raise ValueError(f"a box is three slices (z, y, x) with step 1, got {box!r}")
        for s, n in zip(box, shape):
            if not 0 <= s.start < s.stop <= n:
                raise ValueError(f"box {box} is not inside the {shape} output")
        size = tuple(s.stop - s.start for s in box)
        if data.shape != size:
            raise ValueError(f"data of shape {data.shape} for a box of shape {size}")
        if data.dtype not in (np.uint8, np.bool_):
            raise TypeError(f"an output holds uint8 voxels; got {data.dtype} (convert, e.g. probabilities * 255)")

    # ---------------------------------------------------------------- the pyramid

    def build_pyramid(self, levels: int = 5, reduce: str = "max", progress: bool = True) -> None:
        """Levels 1..levels, each 2x downsampled from the one before ("max" for masks, "mean" for
        probabilities, rounded half up), computed block by block with bounded memory (never a whole level in
        memory) under a progress bar. The multiscales metadata lists every level with scale
        ``2**level * scale0`` and the half-voxel-shifted translation (see :func:`multiscale_metadata`).
        Idempotent: rebuilding overwrites the levels (and removes levels beyond ``levels``)."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if not isinstance(levels, int) or levels < 0:
            raise ValueError(f"levels must be a non-negative integer, got {levels!r}")
        self._remove_levels_above(0)
        shapes = [self.shape]
        for _ in range(levels):
            shapes.append(tuple((n + 1) // 2 for n in shapes[-1]))
        arrays = [self._array] + [self._create_level(self._group, str(k), shapes[k], self.chunks, self.shard,
                                                     self.zarr_format) for k in range(1, levels + 1)]
        jobs = [(k, box) for k in range(1, levels + 1) for box in aligned_blocks(shapes[k], self.write_unit)]
        for k, box in _track(jobs, f"pyramid of {self.path.name}", progress):
            self._downsample_block(arrays[k - 1], arrays[k], box, reduce)
        scale, translation = self._level0_transform()
        attrs = self._group.attrs.asdict()
        entry = multiscale_metadata(levels, scale, translation, name=_multiscale(attrs).get("name", "image"),
                                    reduce=reduce if levels else None)
        self._group.attrs.update(_with_multiscale(attrs, self.zarr_format, entry))

    def _downsample_block(self, source, target, box: Box, reduce: str) -> None:
        """One output block from its 2x source region, a slab of at most PYRAMID_BLOCK_VOXELS at a time."""
        size = tuple(s.stop - s.start for s in box)
        result = np.zeros(size, np.uint8)
        slab = max(1, PYRAMID_BLOCK_VOXELS // max(1, size[1] * size[2]))
        for z in range(0, size[0], slab):
            part = slice(z, min(z + slab, size[0]))
            region = (slice(2 * (box[0].start + part.start), min(2 * (box[0].start + part.stop), source.shape[0])),
                      slice(2 * box[1].start, min(2 * box[1].stop, source.shape[1])),
                      slice(2 * box[2].start, min(2 * box[2].stop, source.shape[2])))
            block = source[region]
            if block.any():
                result[part] = downsample2(block, reduce)
        if result.any():  # the level was created empty: nothing to write for air
            target[box] = result

    def _remove_levels_above(self, keep: int) -> None:
        """Delete the arrays of levels above ``keep`` (a rebuilt pyramid may have fewer levels)."""
        # Looked up by name, not listed: a listing warns about the folders that are not zarr (``.vlab``).
        level = keep + 1
        while str(level) in self._group:
            del self._group[str(level)]
            level += 1

    # ---------------------------------------------------------------- for viewers

    def write_meta_json(self, *, name: str, voxel_size: float | None, **extra) -> None:
        """A VC3D (volume-cartographer) ``meta.json`` beside the levels, so the output opens as a volume there:
        type "vol", uuid, name, width (x), height (y), slices (z), voxelsize (0.0 when unknown), min, max and
        format "zarr". ``extra`` keys are added (``uuid`` among them; by default the name, as VC3D does for a
        volume without one)."""
        depth, height, width = self.shape
        meta = {"type": "vol", "uuid": name, "name": name, "width": width, "height": height,
                "slices": depth, "voxelsize": float(voxel_size) if voxel_size is not None else 0.0,
                "min": 0.0, "max": 255.0, "format": "zarr"}
        meta.update(_jsonable(extra))
        write_text_atomic(self.path / "meta.json", json.dumps(meta, indent=2) + "\n")


def add_label_image(image: OmeZarrOutput, name: str, *, colors: dict[int, list[int]] | None = None,
                    attrs: dict | None = None) -> OmeZarrOutput:
    """A new NGFF label image ``image.path/labels/<name>`` (same shape, chunks, shards, format, scale and
    translation as ``image``), listed in the ``labels`` group; returned for writing like any output."""
    import zarr

    zarr_format = image.zarr_format
    scale, translation = image._level0_transform()
    labels = zarr.open_group(image.path / "labels", mode="a", zarr_format=zarr_format)
    listed = labels.attrs.asdict()
    if zarr_format == 2:
        labels.attrs.update({"labels": sorted({*listed.get("labels", []), name})})
    else:
        ome = listed.get("ome", {})
        labels.attrs.update({"ome": {**ome, "version": "0.5", "labels": sorted({*ome.get("labels", []), name})}})
    label = OmeZarrOutput.create(image.path / "labels" / name, shape=image.shape, chunks=image.chunks,
                                 zarr_format=zarr_format, shard=image.shard, scale=scale, translation=translation,
                                 attrs=attrs, name=name)
    image_label: dict[str, Any] = {"source": {"image": "../../"}}
    if colors:
        image_label["colors"] = [{"label-value": int(k), "rgba": list(v)} for k, v in sorted(colors.items())]
    current = label._group.attrs.asdict()
    if zarr_format == 2:
        label._group.attrs.update({"image-label": {"version": "0.4", **image_label}})
    else:
        label._group.attrs.update({"ome": {**current["ome"], "image-label": image_label}})
    return label


def _track(items: list, description: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True, console=err)
