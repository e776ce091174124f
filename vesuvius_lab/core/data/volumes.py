"""Volumes of any size, read a box at a time: TIFF, zarr (v2, v3), OME-Zarr, local or over fsspec URLs.

:func:`open_volume` accepts

* a ``.tif``/``.tiff`` file (read lazily through tifffile's zarr view: a box reads only its pages);
* a zarr array folder, format 2 (``.zarray``) or 3 (``zarr.json``);
* an OME-Zarr image group: NGFF 0.4 ``multiscales`` in ``.zattrs`` (zarr v2) or NGFF 0.5 under
  ``attributes.ome`` in ``zarr.json`` (zarr v3); ``level`` picks the dataset (default 0), and the voxel
  size and offset come from that dataset's ``coordinateTransformations`` followed by the multiscale's own;
  leading non-spatial axes of size 1 (``t``, ``c``) are dropped;
* a plain zarr group that holds exactly one 3D array;
* the same behind an fsspec URL: ``http://``, ``https://`` (read-only), ``file://``, or any protocol whose
  fsspec package is installed.

The result, a :class:`VolumeSource`, is small and picklable: unpickling opens the volume again from its
``location`` and ``level``, so every worker process of a block-wise prediction gets its own file handles,
HTTP session and event loop.

Every input a user can get wrong (a missing path, a folder that is not a zarr, a missing level, a
volume of the wrong rank or type, an unreachable URL, damaged metadata) is a :class:`UserError` of one
paragraph. The exceptions of the libraries underneath (zarr, fsspec, aiohttp, tifffile) are turned into
messages in one place, :func:`library_error`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import traceback
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vesuvius_lab.core.errors import UserError, absence, brief

Shape3 = tuple[int, int, int]
Box = tuple[slice, slice, slice]

#: Voxel types a model can be run on; anything else is refused (scroll volumes are uint8).
ACCEPTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
TIFF_SUFFIXES = (".tif", ".tiff")
#: The metadata files of a zarr node, v3 first; a damaged one is named in the message.
ZARR_METADATA_KEYS = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_EXPECTED = ("Give a .tif/.tiff volume, a zarr array folder, an OME-Zarr image folder, or an http(s):// URL "
             "of one.")


class VolumeSourceError(UserError):
    """A volume that cannot be opened or read: missing, unreachable, damaged, of the wrong rank or type."""


# --------------------------------------------------------------------------- where a volume lives


@dataclass(frozen=True)
class _Where:
    """A location as given, resolved to a local path or an fsspec URL."""

    location: str
    path: Path | None  # local
    url: str | None  # remote (fsspec), without a trailing slash

    @classmethod
    def parse(cls, location: str | Path) -> "_Where":
        text = str(location)
        if not _URL.match(text):
            return cls(text, Path(text).expanduser(), None)
        if text.lower().startswith("file://"):
            return cls(text, Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)), None)
        return cls(text, None, text.rstrip("/"))

    @property
    def is_tiff(self) -> bool:
        name = self.path.name if self.path is not None else urllib.parse.urlparse(self.url).path
        return name.lower().endswith(TIFF_SUFFIXES)

    def join(self, key: str) -> str:
        """The location of ``key`` inside this one, for messages."""
        return f"{self.url}/{key}" if self.url is not None else str(self.path / key)

    def filesystem(self):
        import fsspec

        protocol = self.url.split("://", 1)[0]
        return fsspec.filesystem(protocol)

    def zarr_store(self):
        from zarr.storage import FsspecStore, LocalStore

        if self.url is None:
            return LocalStore(self.path, read_only=True)
        return FsspecStore.from_url(self.url, read_only=True)

    def child(self, key: str) -> "_Where":
        """The node at ``key`` inside this one."""
        if not key:
            return self
        return _Where(self.join(key), self.path / key if self.path is not None else None,
                      self.join(key) if self.url is not None else None)

    def read_key(self, key: str) -> bytes | None:
        """The bytes of ``key`` under this location, or None when it is absent (any error reads as absent)."""
        try:
            if self.url is None:
                return (self.path / key).read_bytes()
            return self.filesystem().cat_file(self.join(key))
        except Exception:  # a diagnosis must never raise: absent, unreadable or unreachable
            return None


# --------------------------------------------------------------------------- the one translation


def library_error(exc: BaseException, where: str, *, metadata: bool = False,
                  node: "_Where | None" = None) -> UserError | None:
    """The :class:`UserError` for an exception raised by zarr, fsspec, aiohttp or tifffile while opening or
    reading the volume at ``where``, or None when it is not one a user can cause (a bug: keep the traceback).

    ``metadata``: the exception was raised while zarr opened a node, so a ``KeyError``/``TypeError``/
    ``ValueError`` means a damaged ``.zarray``/``zarr.json``/``.zattrs``; ``node``: where that node lives,
    to name the damaged file.
    """
    import aiohttp
    import zarr.errors

    if isinstance(exc, UserError):
        return exc
    # aiohttp (under fsspec's HTTP file system): the network
    if isinstance(exc, aiohttp.ClientResponseError):
        url = getattr(exc.request_info, "real_url", None) or where
        return VolumeSourceError(f"{where}: the server answered {exc.status} {exc.message or ''} for {url}. Check "
                                 "the URL and that you may read it.")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return VolumeSourceError(f"{where}: cannot resolve the host name ({brief(exc.os_error, 120)}). Check the "
                                 "URL's host and the network connection.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return VolumeSourceError(f"{where}: cannot connect to {exc.host}:{exc.port} ({brief(exc.os_error, 120)}). "
                                 "Check the URL and that the server is running and reachable from this machine.")
    if isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError)):
        return VolumeSourceError(f"{where}: the network transfer failed ({type(exc).__name__}: {brief(exc, 120)}). "
                                 "Check the connection and run the command again.")
    # fsspec: the URL's protocol
    if isinstance(exc, ValueError) and str(exc).startswith("Protocol not known"):
        return VolumeSourceError(f"{where}: unknown URL protocol ({brief(exc)}). Use a local path, file://, "
                                 "http:// or https://.")
    if isinstance(exc, ImportError):
        return VolumeSourceError(f"{where}: reading this location needs a package that is not installed "
                                 f"({brief(exc)}).")
    # zarr: missing nodes, codecs, damaged metadata
    if isinstance(exc, zarr.errors.UnknownCodecError):
        return VolumeSourceError(f"{where}: the volume is compressed with a codec this installation cannot "
                                 f"decode ({brief(exc)}). Install the codec's package or convert the volume.")
    if isinstance(exc, ValueError) and "checksum" in str(exc).lower():
        return VolumeSourceError(f"{where}: data read from the volume does not match its stored checksum "
                                 f"({brief(exc, 100)}). A chunk or shard file is damaged, or (over a URL) the server "
                                 "ignores HTTP byte-range requests, which sharded zarr v3 needs; copy the volume "
                                 "again or serve it from a server that honours ranges.")
    if _raised_in_codec(exc):
        return VolumeSourceError(f"{where}: a chunk of the volume cannot be decoded ({type(exc).__name__}: "
                                 f"{brief(exc, 100)}): its file is damaged or truncated. Copy or download the volume "
                                 "again.")
    if isinstance(exc, zarr.errors.NodeNotFoundError):
        return VolumeSourceError(f"{where}: not a zarr: found no zarr.json, .zarray or .zgroup there{_status(node)}. "
                                 f"Check the path or URL: it must name the folder that holds that metadata. {_EXPECTED}")
    if isinstance(exc, json.JSONDecodeError) or (metadata and isinstance(exc, (KeyError, TypeError, ValueError))):
        damaged = _damaged_metadata(node) if node is not None else None
        what = f"the zarr metadata file {damaged}" if damaged else "its zarr metadata (zarr.json, .zarray, .zattrs)"
        return VolumeSourceError(f"{where}: {what} is damaged ({type(exc).__name__}: {brief(exc, 120)}). Copy or "
                                 "download the volume again, or repair the file (a JSON object as the zarr "
                                 "specification describes).")
    # tifffile
    if type(exc).__module__.startswith("tifffile"):
        return VolumeSourceError(f"{where}: cannot decode this TIFF ({type(exc).__name__}: {brief(exc, 120)}). The "
                                 "file is corrupt or truncated; copy or download it again.")
    return None


#: Where decompression happens: an exception raised in these packages while reading means damaged data.
_CODEC_PACKAGES = ("numcodecs", f"zarr{os.sep}codecs", "imagecodecs")


def _raised_in_codec(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return any(package in frame.filename for frame in frames for package in _CODEC_PACKAGES)


@contextmanager
def translated_errors(where: str, *, metadata: bool = False, node: "_Where | None" = None) -> Iterator[None]:
    """Turn the libraries' exceptions into :class:`UserError` through :func:`library_error`."""
    try:
        yield
    except Exception as exc:
        error = library_error(exc, where, metadata=metadata, node=node)
        if error is None or error is exc:
            raise
        raise error from None


def _damaged_metadata(node: _Where) -> str | None:
    """The zarr metadata file at ``node`` that is present but not a JSON object, else the ones present
    (one of them lacks what zarr needs)."""
    present = []
    for key in ZARR_METADATA_KEYS:
        raw = node.read_key(key)
        if raw is None:
            continue
        present.append(node.join(key))
        try:
            if not isinstance(json.loads(raw), dict):
                return present[-1]
        except ValueError:
            return present[-1]
    return " or ".join(present) or None


def _status(node: _Where | None) -> str:
    """For a URL: what the server answers for zarr.json (a 404 says the URL is wrong)."""
    if node is None or node.url is None:
        return ""
    try:
        node.filesystem().cat_file(node.join("zarr.json"))
    except FileNotFoundError:
        return " (the server answers 404 Not Found for zarr.json and .zarray)"
    except Exception as exc:  # a diagnosis only
        return f" ({type(exc).__name__}: {brief(exc, 80)})"
    return ""


# --------------------------------------------------------------------------- the source


def _box_shape(box: Box) -> Shape3:
    if len(box) != 3 or not all(isinstance(s, slice) for s in box):
        raise ValueError(f"a box is three slices (z, y, x), got {box!r}")
    for s in box:
        if s.step not in (None, 1) or not isinstance(s.start, (int, np.integer)) or \
                not isinstance(s.stop, (int, np.integer)) or s.stop < s.start:
            raise ValueError(f"box slices need integer start <= stop and step 1, got {s!r}")
    return tuple(int(s.stop - s.start) for s in box)  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeSource:
    """A 3D volume opened for reading boxes; see :func:`open_volume`.

    ``chunks`` is the storage chunk (the inner chunk of a sharded zarr v3; one page for a TIFF) and
    ``shards`` the shard shape (None unless sharded): block plans align to them. ``scale`` and
    ``translation`` map a voxel index ``i`` of this level to physical space: ``scale * i + translation``.
    """

    location: str
    shape: Shape3
    dtype: np.dtype
    chunks: Shape3 | None
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    level: int | None = None
    shards: Shape3 | None = None
    _array: Any = field(default=None, repr=False, compare=False)
    _lead: tuple[int, ...] = field(default=(), repr=False, compare=False)  # index of dropped size-1 axes
    _handle: Any = field(default=None, repr=False, compare=False)  # an open file to close (a TIFF)

    def read(self, box: Box) -> np.ndarray:
        """The voxels of ``box`` (integer global coordinates, steps of 1); the parts of the box outside
        [0, shape) are zero-filled, so a box may extend past the volume on any side."""
        size = _box_shape(box)
        inside = tuple(slice(min(max(int(s.start), 0), n), max(min(int(s.stop), n), 0))
                       for s, n in zip(box, self.shape))
        if all(s.stop > s.start for s in inside) and size == tuple(s.stop - s.start for s in inside):
            return self._read_inside(inside)
        result = np.zeros(size, self.dtype)
        if all(s.stop > s.start for s in inside):
            target = tuple(slice(i.start - int(b.start), i.stop - int(b.start)) for i, b in zip(inside, box))
            result[target] = self._read_inside(inside)
        return result

    def _read_inside(self, box: Box) -> np.ndarray:
        with translated_errors(self.location):
            data = np.asarray(self._array[self._lead + tuple(box)])
        return data.astype(self.dtype, copy=False)

    def provenance(self) -> dict:
        """Where the voxels came from, JSON-ready: location, level, shape, dtype, scale, translation."""
        return {"location": self.location, "level": self.level, "shape": list(self.shape),
                "dtype": str(self.dtype), "scale": list(self.scale), "translation": list(self.translation)}

    def close(self) -> None:
        """Release an open file (a TIFF); other sources hold nothing to release."""
        if self._handle is not None:
            self._handle.close()

    def __reduce__(self):
        # Reopen from the location rather than pickle handles, sessions and event loops.
        return (_reopen, (self.location, self.level))


def _reopen(location: str, level: int | None) -> VolumeSource:
    return open_volume(location, level=level)


# --------------------------------------------------------------------------- opening


def open_volume(location: str | Path, *, level: int | None = None) -> VolumeSource:
    """Open the volume at ``location`` (a path or fsspec URL) for reading boxes; see the module's docstring.

    ``level`` picks an OME-Zarr multiscale level (default 0); for a volume without levels only None or 0
    are accepted. Raises :class:`VolumeSourceError` (a :class:`UserError`) saying what is wrong.
    """
    where = _Where.parse(location)
    if level is not None and (not isinstance(level, (int, np.integer)) or level < 0):
        raise VolumeSourceError(f"{where.location}: level {level!r} is not a level number; give 0 for full "
                                "resolution, 1 for half, and so on.")
    if where.path is not None:
        _check_local(where)
    if where.is_tiff:
        return _open_tiff(where, level)
    node = _open_zarr_node(where)
    return _source_from_node(node, where, level)


def _check_local(where: _Where) -> None:
    path = where.path
    if not path.exists() or not (path.is_file() or path.is_dir()):
        raise VolumeSourceError(f"{where.location}: volume {absence(path, 'any')}. {_EXPECTED}")
    if path.is_file() and not where.is_tiff:
        hint = ("It is a zarr metadata file: give the folder that holds it." if path.name in ZARR_METADATA_KEYS
                else _EXPECTED)
        raise VolumeSourceError(f"{where.location}: a file that is not a TIFF (.tif/.tiff). {hint}")


def _open_tiff(where: _Where, level: int | None) -> VolumeSource:
    """A TIFF's first series through tifffile's zarr view: a box decodes only the pages (strips) it needs."""
    import tifffile
    import zarr

    if level not in (None, 0):
        raise VolumeSourceError(f"{where.location}: a TIFF has one level only (level 0); level {level} does not "
                                "exist.")
    with translated_errors(where.location):
        if where.url is None:
            from vesuvius_lab.core.data.tiff import read_header

            read_header(where.path)  # a damaged or truncated file is refused from its headers
            store = tifffile.imread(where.path, aszarr=True, series=0, level=0)
        else:  # an fsspec file object: tifffile reads headers and pages through ranged requests
            import fsspec

            store = tifffile.TiffFile(fsspec.open(where.url, "rb").open()).series[0].aszarr(level=0)
        array = zarr.open_array(store, mode="r")
    try:
        return _make_source(where, array, (), shards=None, handle=store)
    except UserError:
        store.close()
        raise


def _open_zarr_node(where: _Where, path: str = ""):
    """The zarr array or group at ``where``/``path``, any format, read-only."""
    import zarr

    with translated_errors(where.location, metadata=True, node=where.child(path)):
        return zarr.open(store=where.zarr_store(), path=path, mode="r")


def _source_from_node(node, where: _Where, level: int | None) -> VolumeSource:
    import zarr

    if isinstance(node, zarr.Array):
        _no_levels(where, level)
        return _make_source(where, node, ())
    attrs = node.attrs.asdict()
    multiscales = (attrs.get("ome") or {}).get("multiscales") if isinstance(attrs.get("ome"), dict) else None
    multiscales = multiscales or attrs.get("multiscales")
    if multiscales:
        return _open_ome_level(node, where, multiscales, level)
    _no_levels(where, level)
    return _make_source(where, *_single_array(node, where))


def _no_levels(where: _Where, level: int | None) -> None:
    if level not in (None, 0):
        raise VolumeSourceError(f"{where.location}: not a multiscale OME-Zarr, so it has only level 0; level "
                                f"{level} does not exist. Leave out the level or give an OME-Zarr image.")


def _single_array(group, where: _Where):
    """The one 3D array of a plain zarr group (and no dropped axes)."""
    with translated_errors(where.location, metadata=True):
        arrays = sorted(group.arrays(), key=lambda item: item[0])
    volumes = [(name, array) for name, array in arrays if array.ndim == 3]
    if len(volumes) == 1:
        return volumes[0][1], ()
    listed = ", ".join(f"{name} {tuple(array.shape)}" for name, array in arrays) or "none"
    if not volumes:
        listing = " (over a URL, a server that does not list folders shows none)" if where.url else ""
        raise VolumeSourceError(f"{where.location}: a zarr group without OME multiscales metadata and without a "
                                f"3D array (arrays found: {listed}{listing}). Give the path or URL of the 3D array "
                                "itself, or an OME-Zarr image.")
    raise VolumeSourceError(f"{where.location}: a zarr group with several 3D arrays ({listed}) and no OME "
                            f"multiscales metadata to choose between them. Give the path of one, e.g. "
                            f"{where.join(volumes[0][0])}.")


def _metadata_file(group) -> str:
    return "zarr.json" if group.metadata.zarr_format == 3 else ".zattrs"


def _open_ome_level(group, where: _Where, multiscales, level: int | None) -> VolumeSource:
    """The array of one multiscale level, with its voxel size and offset."""
    try:
        multiscale = multiscales[0]
        datasets = multiscale["datasets"]
        paths = [str(dataset["path"]) for dataset in datasets]
    except (KeyError, TypeError, IndexError) as exc:
        raise _bad_ome(group, where, f"no datasets list ({type(exc).__name__}: {brief(exc, 60)})") from None
    if not paths:
        raise _bad_ome(group, where, "the datasets list is empty")
    level = 0 if level is None else int(level)
    if level >= len(paths):
        raise VolumeSourceError(f"{where.location}: level {level} does not exist; this OME-Zarr has level(s) "
                                f"0-{len(paths) - 1} (paths {', '.join(paths)}). Give one of those.")
    try:
        array = _open_zarr_node(where, paths[level])
    except VolumeSourceError as exc:
        raise VolumeSourceError(f"{where.location}: the multiscales metadata lists level {level} at path "
                                f"'{paths[level]}', but it cannot be opened: {exc}") from None
    import zarr

    if not isinstance(array, zarr.Array):
        raise _bad_ome(group, where, f"level {level}'s path '{paths[level]}' is a group, not an array")
    lead = _dropped_axes(array, multiscale, where)
    try:
        scale, translation = _transform(datasets[level].get("coordinateTransformations"), array.ndim)
        outer_scale, outer_translation = _transform(multiscale.get("coordinateTransformations"), array.ndim)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _bad_ome(group, where, f"the coordinateTransformations of level {level} are not valid "
                                     f"({type(exc).__name__}: {brief(exc, 60)})") from None
    # NGFF: the multiscale's transformations apply after the dataset's.
    scale_3 = tuple(float(a * b) for a, b in zip(outer_scale, scale))
    translation_3 = tuple(float(a * t + u) for a, t, u in zip(outer_scale, translation, outer_translation))
    return _make_source(where, array, lead, scale=scale_3, translation=translation_3, level=level)


def _bad_ome(group, where: _Where, what: str) -> VolumeSourceError:
    return VolumeSourceError(f"{where.join(_metadata_file(group))}: the OME-Zarr multiscales metadata is not valid: "
                             f"{what}. Fix the metadata (NGFF 0.4 or 0.5) or give the path of a level's array.")


def _dropped_axes(array, multiscale: dict, where: _Where) -> tuple[int, ...]:
    """Index 0 for each leading axis of size 1 that is not spatial (t, c), so that three axes remain."""
    extra = array.ndim - 3
    if extra <= 0:
        return ()
    axes = multiscale.get("axes") or []
    names = [axis.get("name") if isinstance(axis, dict) else axis for axis in axes]
    kinds = [axis.get("type") if isinstance(axis, dict) else None for axis in axes]
    leading_ok = all(array.shape[i] == 1 and kinds[i] != "space" for i in range(extra)) if len(axes) == array.ndim \
        else all(n == 1 for n in array.shape[:extra])
    if not leading_ok:
        raise VolumeSourceError(f"{where.location}: the volume has {array.ndim} axes ({', '.join(map(str, names)) or '?'}"
                                f", shape {tuple(array.shape)}); only 3D (z, y, x) volumes, with any extra leading "
                                "axis of size 1, can be predicted. Give a single-channel 3D volume.")
    return (0,) * extra


def _transform(transforms, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, translation) of the last three axes from a list of NGFF coordinate transformations."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for item in transforms or []:
        kind = item["type"]
        if kind == "scale":
            values = [float(v) for v in item["scale"]]
            scale = [a * v for a, v in zip(scale, _axes(values, ndim))]
            translation = [t * v for t, v in zip(translation, _axes(values, ndim))]
        elif kind == "translation":
            translation = [t + v for t, v in zip(translation, _axes([float(v) for v in item["translation"]], ndim))]
        elif kind != "identity":
            raise ValueError(f"unsupported transformation type {kind!r}")
    return tuple(scale[-3:]), tuple(translation[-3:])


def _axes(values: list[float], ndim: int) -> list[float]:
    if len(values) != ndim or not all(np.isfinite(values)):
        raise ValueError(f"{len(values)} finite values expected for {ndim} axes, got {values}")
    return values


def _make_source(where: _Where, array, lead: tuple[int, ...], *, shards="auto", scale=(1.0, 1.0, 1.0),
                 translation=(0.0, 0.0, 0.0), level: int | None = None, handle=None) -> VolumeSource:
    """Check rank and type, then wrap the array."""
    shape = tuple(int(n) for n in array.shape[len(lead):])
    if len(shape) != 3:
        raise VolumeSourceError(f"{where.location}: the volume has {array.ndim} axes (shape {tuple(array.shape)}); "
                                "only 3D volumes (z, y, x) can be predicted. Give a 3D volume (a multi-page TIFF, "
                                "a 3D zarr array, or a 3D OME-Zarr image).")
    dtype = np.dtype(array.dtype)
    if dtype not in ACCEPTED_DTYPES:
        raise VolumeSourceError(f"{where.location}: voxels of type {dtype} are refused; uint8 is expected (scroll CT), "
                                f"uint16 and float32 are accepted too. Convert the volume to uint8.")
    chunks = tuple(array.chunks)
    if shards == "auto":
        shards = getattr(array, "shards", None)
    drop = len(lead)
    return VolumeSource(location=where.location, shape=shape, dtype=dtype,
                        chunks=tuple(int(n) for n in chunks[drop:]) if chunks else None,
                        scale=tuple(float(v) for v in scale), translation=tuple(float(v) for v in translation),
                        level=level, shards=tuple(int(n) for n in shards[drop:]) if shards else None,
                        _array=array, _lead=lead, _handle=handle)
