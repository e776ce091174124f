"""Volume I/O for whole-scroll prediction: reading TIFF, zarr, OME-Zarr (local and over HTTP), writing
OME-Zarr outputs with their pyramid, and the synthetic scroll zarr."""

from __future__ import annotations

import functools
import http.server
import json
import multiprocessing
import pickle
import socket
import threading
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from vesuvius_lab.cli import cli, main
from vesuvius_lab.core.data.ome_output import OmeZarrOutput, aligned_blocks, downsample2
from vesuvius_lab.core.data.synthetic_zarr import LABEL_NAME, render_block, scroll_parameters, stored_chunks, \
    write_scroll_zarr
from vesuvius_lab.core.data.volumes import VolumeSource, open_volume
from vesuvius_lab.core.errors import UserError

SHAPE = (37, 41, 29)  # multiples of nothing
WHOLE = (slice(0, SHAPE[0]), slice(0, SHAPE[1]), slice(0, SHAPE[2]))


def _volume(dtype=np.uint8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 250, SHAPE).astype(dtype)


def _zarr_array(path: Path, data: np.ndarray, zarr_format: int, **options) -> Path:
    array = zarr.create_array(path, shape=data.shape, chunks=(16,) * data.ndim, dtype=data.dtype, fill_value=0,
                              zarr_format=zarr_format, **options)
    array[:] = data
    return path


def _ome_by_library(path: Path, data: np.ndarray, version: str) -> Path:
    """An OME-Zarr written by ome-zarr-py (NGFF 0.4 on zarr v2, 0.5 on v3) with two levels."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscale

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(path, mode="w", zarr_format=fmt.zarr_format)
    transforms = [[{"type": "scale", "scale": [0.5, 0.25, 0.25]}, {"type": "translation", "translation": [1, 2, 3]}],
                  [{"type": "scale", "scale": [1.0, 0.5, 0.5]}, {"type": "translation", "translation": [1.5, 2, 3]}]]
    write_multiscale([data, data[::2, ::2, ::2].copy()], group, axes="zyx", fmt=fmt,
                     coordinate_transformations=transforms, storage_options={"chunks": (16, 16, 16)})
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, dict[str, Path], np.ndarray]:
    """One volume stored every way the reader accepts."""
    root = tmp_path_factory.mktemp("volumes")
    data = _volume()
    tifffile.imwrite(root / "volume.tif", data, compression="zlib")
    paths = {
        "tiff": root / "volume.tif",
        "zarr v2": _zarr_array(root / "v2.zarr", data, 2),
        "zarr v3": _zarr_array(root / "v3.zarr", data, 3),
        "zarr v3 sharded": _zarr_array(root / "v3s.zarr", data, 3, shards=(32, 32, 32)),
        "ome 0.4": _ome_by_library(root / "ome04.zarr", data, "0.4"),
        "ome 0.5": _ome_by_library(root / "ome05.zarr", data, "0.5"),
    }
    plain = zarr.open_group(root / "plain.zarr", mode="w", zarr_format=2)
    plain.create_array("volume", shape=SHAPE, chunks=(16, 16, 16), dtype="uint8")[:] = data
    plain.create_array("flat", shape=(5,), dtype="uint8")
    paths["group with one 3D array"] = root / "plain.zarr"
    return root, paths, data


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("kind", ["tiff", "zarr v2", "zarr v3", "zarr v3 sharded", "ome 0.4", "ome 0.5",
                                  "group with one 3D array"])
def test_every_kind_reads_back_what_was_written(sources, kind):
    _, paths, data = sources
    source = open_volume(paths[kind])
    assert source.shape == SHAPE and source.dtype == np.uint8
    assert np.array_equal(source.read(WHOLE), data)
    box = (slice(3, 30), slice(17, 40), slice(1, 28))
    assert np.array_equal(source.read(box), data[box])
    assert json.loads(json.dumps(source.provenance()))["shape"] == list(SHAPE)


def test_sharded_zarr_reports_chunks_and_shards(sources):
    source = open_volume(sources[1]["zarr v3 sharded"])
    assert source.chunks == (16, 16, 16) and source.shards == (32, 32, 32)
    assert open_volume(sources[1]["tiff"]).chunks[0] == 1  # a page per slice


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_levels_carry_scale_and_translation(sources, version):
    _, paths, data = sources
    top = open_volume(paths[f"ome {version}"])
    assert top.level == 0 and top.scale == (0.5, 0.25, 0.25) and top.translation == (1.0, 2.0, 3.0)
    half = open_volume(paths[f"ome {version}"], level=1)
    assert half.level == 1 and half.shape == (19, 21, 15)
    assert half.scale == (1.0, 0.5, 0.5) and half.translation == (1.5, 2.0, 3.0)
    assert np.array_equal(half.read((slice(0, 19), slice(0, 21), slice(0, 15))), data[::2, ::2, ::2])


def test_multiscale_transforms_compose_and_a_singleton_channel_axis_is_dropped(tmp_path):
    """NGFF: the multiscale's own transformations apply after the dataset's; czyx with c = 1 reads as zyx."""
    data = _volume()
    group = zarr.open_group(tmp_path / "c.zarr", mode="w", zarr_format=2)
    group.create_array("s0", shape=(1, *SHAPE), chunks=(1, 16, 16, 16), dtype="uint8")[:] = data[None]
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 2, 2, 2]}, {"type": "translation", "translation": [0, 1, 1, 1]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 3, 3, 3]},
                                      {"type": "translation", "translation": [0, 10, 0, 0]}]}]
    source = open_volume(tmp_path / "c.zarr")
    assert source.shape == SHAPE
    assert source.scale == (6.0, 6.0, 6.0) and source.translation == (13.0, 3.0, 3.0)
    assert np.array_equal(source.read(WHOLE), data)


@pytest.mark.parametrize("kind", ["tiff", "zarr v2", "ome 0.5"])
def test_boxes_outside_the_volume_are_zero_filled(sources, kind):
    _, paths, data = sources
    source = open_volume(paths[kind])
    padded = np.pad(data, 8)  # the volume seen with 8 voxels of zeros on every side

    def expected(box):
        return padded[tuple(slice(s.start + 8, s.stop + 8) for s in box)]

    for box in [(slice(-8, 5), slice(-3, 41), slice(20, 37)),  # past the near and the far faces
                (slice(30, 45), slice(35, 49), slice(-8, -2)),  # partly, and an axis wholly outside
                (slice(-8, 45), slice(-8, 49), slice(-8, 37)),  # around the whole volume
                (slice(37, 45), slice(0, 41), slice(0, 29)),  # wholly past the end
                (slice(4, 4), slice(0, 3), slice(0, 3))]:  # empty
        block = source.read(box)
        assert block.shape == tuple(s.stop - s.start for s in box) and block.dtype == np.uint8
        assert np.array_equal(block, expected(box)), box


def test_read_refuses_boxes_that_are_not_integer_unit_slices(sources):
    source = open_volume(sources[1]["zarr v2"])
    for box in [(slice(0, 4), slice(0, 4)), (slice(0, 4, 2), slice(0, 4), slice(0, 4)),
                (slice(None, 4), slice(0, 4), slice(0, 4)), (slice(5, 4), slice(0, 4), slice(0, 4))]:
        with pytest.raises(ValueError):
            source.read(box)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_uint16_and_float32_are_accepted(tmp_path, dtype):
    data = _volume(dtype)
    source = open_volume(_zarr_array(tmp_path / "v.zarr", data, 2))
    assert source.dtype == dtype and np.array_equal(source.read(WHOLE), data)


def _read_boxes(source: VolumeSource, boxes):
    return [source.read(box) for box in boxes]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_a_source_pickles_and_reads_in_worker_processes(sources, start_method):
    _, paths, data = sources
    boxes = [(slice(0, 20), slice(0, 41), slice(0, 29)), (slice(20, 37), slice(-2, 30), slice(5, 35))]
    padded = np.pad(data, 8)
    for kind in ("tiff", "ome 0.4"):
        source = open_volume(paths[kind])
        again = pickle.loads(pickle.dumps(source))
        assert again == source and np.array_equal(again.read(WHOLE), data)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(start_method)) as pool:
            blocks = pool.submit(_read_boxes, source, boxes).result(timeout=120)
        for box, block in zip(boxes, blocks):
            assert np.array_equal(block, padded[tuple(slice(s.start + 8, s.stop + 8) for s in box)])


# --------------------------------------------------------------------------- over HTTP


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server plus HTTP byte ranges ("bytes=a-b", "bytes=-n"), which sharded zarr v3 reads
    need and every real object store serves; under /norange/ it ignores them, as a poor server would."""

    def do_GET(self):
        ranged = self.headers.get("Range", "")
        if self.path.startswith("/norange/"):
            self.path = self.path[len("/norange"):]
            ranged = ""
        path = Path(self.translate_path(self.path))
        if not ranged.startswith("bytes=") or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        first, _, last = ranged[len("bytes="):].partition("-")
        start, stop = (len(data) - int(last), len(data)) if not first else \
            (int(first), min(int(last) + 1 if last else len(data), len(data)))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        self.wfile.write(data[start:stop])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(sources):
    """A real HTTP server on 127.0.0.1 serving the folder of ``sources``; stopped after the module."""
    root = sources[0]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("kind", ["zarr v2", "zarr v3 sharded", "ome 0.4", "ome 0.5", "tiff"])
def test_http_reads_equal_local_reads(sources, server, kind):
    _, paths, _ = sources
    local = open_volume(paths[kind], level=None)
    remote = open_volume(f"{server}/{paths[kind].name}", level=1 if kind.startswith("ome") else None)
    if kind.startswith("ome"):
        local = open_volume(paths[kind], level=1)
        assert (remote.scale, remote.translation) == (local.scale, local.translation)
    assert remote.shape == local.shape and remote.location.startswith("http://127.0.0.1:")
    box = (slice(-2, 12), slice(3, 25), slice(0, 40))
    assert np.array_equal(remote.read(box), local.read(box))
    assert np.array_equal(pickle.loads(pickle.dumps(remote)).read(box), local.read(box))


def test_a_server_that_ignores_byte_ranges_is_named_not_a_traceback(sources, server):
    remote = open_volume(f"{server}/norange/{sources[1]['zarr v3 sharded'].name}")
    with pytest.raises(UserError, match="byte-range"):
        remote.read(WHOLE)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_urls_are_user_errors_naming_the_url(server):
    port = _closed_port()
    with pytest.raises(UserError, match=rf"http://127\.0\.0\.1:{port}/v2\.zarr: cannot connect") as refused:
        open_volume(f"http://127.0.0.1:{port}/v2.zarr")
    assert "server is running" in str(refused.value)
    with pytest.raises(UserError, match="404") as missing:
        open_volume(f"{server}/no-such.zarr")
    assert f"{server}/no-such.zarr" in str(missing.value)
    with pytest.raises(UserError, match="unknown URL protocol"):
        open_volume("nosuchprotocol://host/volume.zarr")


# --------------------------------------------------------------------------- bad inputs


def _damage(path: Path, name: str) -> Path:
    (path / name).write_text("{not json")
    return path


@pytest.fixture
def bad(tmp_path):
    """A factory of broken inputs by name."""
    def make(name: str) -> tuple[Path, dict]:
        data = _volume()
        if name == "missing":
            return tmp_path / "nothing.zarr", {}
        if name == "folder that is not a zarr":
            (tmp_path / "plain").mkdir()
            (tmp_path / "plain" / "notes.txt").write_text("x")
            return tmp_path / "plain", {}
        if name == "file that is not a volume":
            (tmp_path / "notes.txt").write_text("x")
            return tmp_path / "notes.txt", {}
        if name == "missing level":
            return _ome_by_library(tmp_path / "o.zarr", data, "0.4"), {"level": 5}
        if name == "level of a plain array":
            return _zarr_array(tmp_path / "a.zarr", data, 2), {"level": 1}
        if name == "2D":
            return _zarr_array(tmp_path / "a.zarr", data[0], 2), {}
        if name == "4D":
            return _zarr_array(tmp_path / "a.zarr", np.stack([data, data]), 3), {}
        if name == "int64":
            return _zarr_array(tmp_path / "a.zarr", data.astype(np.int64), 2), {}
        if name == "float64":
            return _zarr_array(tmp_path / "a.zarr", data.astype(np.float64), 3), {}
        if name == "damaged .zarray":
            return _damage(_zarr_array(tmp_path / "a.zarr", data, 2), ".zarray"), {}
        if name == "damaged zarr.json":
            return _damage(_zarr_array(tmp_path / "a.zarr", data, 3), "zarr.json"), {}
        if name == "damaged .zattrs":
            return _damage(_ome_by_library(tmp_path / "o.zarr", data, "0.4"), ".zattrs"), {}
        if name == "damaged level metadata":
            return _damage(_ome_by_library(tmp_path / "o.zarr", data, "0.4") / "1", ".zarray").parent, {"level": 1}
        if name == ".zarray without keys":
            path = _zarr_array(tmp_path / "a.zarr", data, 2)
            (path / ".zarray").write_text('{"zarr_format": 2}')
            return path, {}
        if name == "truncated TIFF":
            tifffile.imwrite(tmp_path / "v.tif", data)
            (tmp_path / "v.tif").write_bytes((tmp_path / "v.tif").read_bytes()[:4000])
            return tmp_path / "v.tif", {}
        if name == "group of several volumes":
            group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=2)
            for key in ("a", "b"):
                group.create_array(key, shape=SHAPE, dtype="uint8")
            return tmp_path / "g.zarr", {}
        raise KeyError(name)

    return make


@pytest.mark.parametrize("name, words", [
    ("missing", ["not found", "zarr"]),
    ("folder that is not a zarr", ["not a zarr", "zarr.json"]),
    ("file that is not a volume", ["not a TIFF"]),
    ("missing level", ["level 5 does not exist", "0-1"]),
    ("level of a plain array", ["only level 0"]),
    ("2D", ["2 axes", "3D"]),
    ("4D", ["4 axes", "3D"]),
    ("int64", ["int64", "uint8 is expected", "refused"]),
    ("float64", ["float64", "uint8 is expected"]),
    ("damaged .zarray", [".zarray is damaged"]),
    ("damaged zarr.json", ["zarr.json is damaged"]),
    ("damaged .zattrs", [".zattrs is damaged"]),
    ("damaged level metadata", ["level 1", ".zarray is damaged"]),
    (".zarray without keys", [".zarray", "damaged", "dtype"]),
    ("truncated TIFF", ["truncated"]),
    ("group of several volumes", ["several 3D arrays", "g.zarr/a"]),
])
def test_bad_inputs_are_one_paragraph_user_errors(bad, name, words):
    path, options = bad(name)
    with pytest.raises(UserError) as caught:
        open_volume(path, **options)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert path.name in message
    for word in words:
        assert word in message, message


def test_a_damaged_chunk_is_a_user_error_at_read(tmp_path):
    path = _zarr_array(tmp_path / "a.zarr", (np.arange(np.prod(SHAPE)) % 7).astype(np.uint8).reshape(SHAPE), 2)
    chunk = path / "0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    source = open_volume(path)
    assert source.read((slice(16, 32), slice(16, 32), slice(16, 29))).any()  # other chunks still read
    with pytest.raises(UserError, match="cannot be decoded.*damaged"):
        source.read(WHOLE)


# --------------------------------------------------------------------------- writing


def _chunk_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and p.name not in {".zarray", ".zattrs", ".zgroup", "zarr.json"})


@pytest.mark.parametrize("zarr_format, shard", [(2, None), (3, None), (3, (16, 16, 16))])
def test_write_stores_only_chunks_that_are_not_all_zero(tmp_path, zarr_format, shard):
    out = OmeZarrOutput.create(tmp_path / "o.zarr", shape=SHAPE, chunks=(8, 8, 8), zarr_format=zarr_format,
                               shard=shard)
    unit = out.write_unit
    data = np.zeros(SHAPE, np.uint8)
    data[0, 0, 0] = 7  # one unit holds a voxel; the rest is air
    data[-1, -1, -1] = 9  # and the far corner (a partial unit)
    for box in aligned_blocks(out.shape, unit, max_voxels=1):
        out.write(box, data[box])
    assert len(_chunk_files(out.path / "0")) == 2
    assert np.array_equal(open_volume(out.path).read(WHOLE), data)
    # A unit that was stored and is now all zero is deleted.
    first = tuple(slice(0, u) for u in unit)
    out.write(first, np.zeros(unit, np.uint8))
    assert len(_chunk_files(out.path / "0")) == 1
    assert open_volume(out.path).read(WHOLE).sum() == 9


def test_create_refuses_an_existing_path_and_open_never_truncates(tmp_path):
    path = tmp_path / "o.zarr"
    out = OmeZarrOutput.create(path, shape=SHAPE, chunks=(16, 16, 16), attrs={"run": "r1", "blocks": 0})
    box = (slice(0, 16), slice(0, 16), slice(0, 16))
    out.write(box, np.full((16, 16, 16), 5, np.uint8))
    with pytest.raises(UserError, match="exists already"):
        OmeZarrOutput.create(path, shape=SHAPE)
    again = OmeZarrOutput.open(path)
    assert again.shape == SHAPE and again.chunks == (16, 16, 16) and again.shard is None
    assert again.attrs == {"run": "r1", "blocks": 0}
    assert np.array_equal(np.asarray(zarr.open_array(path / "0", mode="r")[box]), np.full((16, 16, 16), 5))
    again.update_attrs(blocks=np.int64(1), input={"shape": (1, 2, 3)})
    assert OmeZarrOutput.open(path).attrs == {"run": "r1", "blocks": 1, "input": {"shape": [1, 2, 3]}}
    with pytest.raises(UserError, match="not found"):
        OmeZarrOutput.open(tmp_path / "none.zarr")
    with pytest.raises(UserError, match="not an output"):
        OmeZarrOutput.open(_zarr_array(tmp_path / "a.zarr", _volume(), 2))


def test_create_checks_its_settings(tmp_path):
    with pytest.raises(UserError, match="sharding needs zarr format 3"):
        OmeZarrOutput.create(tmp_path / "a.zarr", shape=SHAPE, shard=(256, 256, 256))
    with pytest.raises(UserError, match="whole number of chunks"):
        OmeZarrOutput.create(tmp_path / "b.zarr", shape=SHAPE, zarr_format=3, chunks=(16, 16, 16), shard=(24, 32, 32))
    with pytest.raises(UserError, match="shape"):
        OmeZarrOutput.create(tmp_path / "c.zarr", shape=(0, 4, 4))
    assert not any(tmp_path.iterdir())


def test_write_takes_boxes_off_the_grid_and_refuses_boxes_outside(tmp_path):
    out = OmeZarrOutput.create(tmp_path / "o.zarr", shape=SHAPE, chunks=(16, 16, 16))
    out.write((slice(32, 37), slice(16, 41), slice(0, 29)), np.ones((5, 25, 29), np.uint8))  # far edges
    out.write((slice(3, 9), slice(5, 16), slice(2, 4)), np.full((6, 11, 2), 7, np.uint8))  # cuts one chunk
    expected = np.zeros(SHAPE, np.uint8)
    expected[32:37, 16:41, 0:29] = 1
    expected[3:9, 5:16, 2:4] = 7
    assert np.array_equal(zarr.open_group(tmp_path / "o.zarr", mode="r")["0"][:], expected)
    for box in [(slice(32, 48), slice(0, 16), slice(0, 16)), (slice(-1, 4), slice(0, 16), slice(0, 16))]:
        with pytest.raises(ValueError):
            out.write(box, np.ones(tuple(s.stop - s.start for s in box), np.uint8))
    with pytest.raises(TypeError):
        out.write((slice(0, 16),) * 3, np.ones((16, 16, 16), np.float32))


def _reference_pyramid_step(volume: np.ndarray, reduce: str) -> np.ndarray:
    """2x2x2 max, or mean of the voxels present rounded half up, from the eight strided views."""
    padded = np.pad(volume.astype(np.float64), [(0, n % 2) for n in volume.shape], constant_values=np.nan)
    views = np.stack([padded[a::2, b::2, c::2] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    values = np.nanmax(views, axis=0) if reduce == "max" else np.floor(np.nanmean(views, axis=0) + 0.5)
    return values.astype(np.uint8)


@pytest.mark.parametrize("zarr_format, shard, reduce", [(2, None, "max"), (2, None, "mean"), (3, (8, 16, 16), "mean")])
def test_pyramid_levels_equal_numpy_block_reductions(tmp_path, zarr_format, shard, reduce):
    data = _volume()
    data[:10] = 0  # air: its chunks stay unstored at every level
    out = OmeZarrOutput.create(tmp_path / "o.zarr", shape=SHAPE, chunks=(4, 8, 8), zarr_format=zarr_format,
                               shard=shard, scale=(2.0, 2.0, 2.0), translation=(10.0, 0.0, 0.0))
    for box in aligned_blocks(out.shape, out.write_unit):
        out.write(box, data[box])
    out.build_pyramid(levels=3, reduce=reduce, progress=False)
    expected = data
    for level in range(1, 4):
        expected = _reference_pyramid_step(expected, reduce)
        source = open_volume(out.path, level=level)
        assert source.shape == expected.shape
        assert np.array_equal(source.read(tuple(slice(0, n) for n in expected.shape)), expected), level
        factor = 2 ** level
        assert source.scale == (2.0 * factor,) * 3
        assert source.translation == (10.0 + (factor - 1), factor - 1.0, factor - 1.0)  # the half-voxel shift
    if zarr_format == 2:  # level 1's first z-chunk covers only air: not stored
        assert _chunk_files(out.path / "1") and not any(n.startswith("0/") for n in _chunk_files(out.path / "1"))
    assert downsample2(data[:2, :3, :1], reduce).shape == (1, 2, 1)


def test_pyramid_is_idempotent_and_rebuilding_with_fewer_levels_drops_the_rest(tmp_path):
    data = _volume()
    out = OmeZarrOutput.create(tmp_path / "o.zarr", shape=SHAPE, chunks=(8, 8, 8))
    out.write(WHOLE, data)
    out.build_pyramid(levels=3, reduce="max", progress=False)
    first = open_volume(out.path, level=2).read((slice(0, 10), slice(0, 11), slice(0, 8)))
    files = _chunk_files(out.path)
    out.build_pyramid(levels=3, reduce="max", progress=False)
    assert _chunk_files(out.path) == files
    assert np.array_equal(open_volume(out.path, level=2).read((slice(0, 10), slice(0, 11), slice(0, 8))), first)
    out.build_pyramid(levels=1, reduce="max", progress=False)
    assert out.levels == 2 and not (out.path / "2").exists() and not (out.path / "3").exists()
    with pytest.raises(UserError, match="level 2 does not exist"):
        open_volume(out.path, level=2)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_py_reads_the_output_and_its_label(tmp_path, zarr_format):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = write_scroll_zarr(tmp_path / "s.zarr", (24, 40, 40), chunks=(16, 16, 16), zarr_format=zarr_format,
                             progress=False)
    image = OmeZarrOutput.open(path)
    image.build_pyramid(levels=2, reduce="mean", progress=False)
    fmt = FormatV04() if zarr_format == 2 else FormatV05()
    nodes = list(Reader(parse_url(str(path), fmt=fmt))())
    assert [tuple(level.shape) for level in nodes[0].data] == [(24, 40, 40), (12, 20, 20), (6, 10, 10)]
    assert np.array_equal(np.asarray(nodes[0].data[1]), open_volume(path, level=1).read(
        (slice(0, 12), slice(0, 20), slice(0, 20))))
    labels = [node for node in nodes if any(type(spec).__name__ == "Label" for spec in node.specs)]
    assert labels and tuple(labels[0].data[0].shape) == (24, 40, 40)


def test_meta_json_for_vc3d(tmp_path):
    out = OmeZarrOutput.create(tmp_path / "o.zarr", shape=SHAPE)
    out.write_meta_json(name="pred-1", voxel_size=7.91, run="r")
    meta = json.loads((out.path / "meta.json").read_text())
    assert meta == {"type": "vol", "uuid": "pred-1", "name": "pred-1", "width": 29, "height": 41, "slices": 37,
                    "voxelsize": 7.91, "min": 0.0, "max": 255.0, "format": "zarr", "run": "r"}
    assert open_volume(out.path).shape == SHAPE  # the extra file does not disturb readers


# --------------------------------------------------------------------------- the synthetic scroll


@pytest.fixture(scope="module")
def scroll(tmp_path_factory) -> Path:
    return write_scroll_zarr(tmp_path_factory.mktemp("scroll") / "scroll.zarr", (96, 128, 128), seed=3,
                             chunks=(32, 16, 16), progress=False)


def test_synthetic_scroll_is_a_spiral_over_air_with_its_label(scroll):
    whole = (slice(0, 96), slice(0, 128), slice(0, 128))
    image = open_volume(scroll).read(whole)
    label = open_volume(scroll / "labels" / LABEL_NAME).read(whole)
    assert image.dtype == label.dtype == np.uint8 and label.shape == image.shape == (96, 128, 128)
    assert set(np.unique(label)) == {0, 1}
    for z in (0, -1):
        for y in (0, -1):
            for x in (0, -1):
                assert image[z, y, x] == 0  # every corner is air
    inside = image > 0
    assert 0.35 < inside.mean() < 0.7  # a cylinder of 0.42 of the side
    sheet, packing = image[label == 1].astype(float), image[inside & (label == 0)].astype(float)
    # Intensities of the training volumes: papyrus 150-200 over packing ("air") 25-55, noise 10-20.
    assert sheet.mean() > np.percentile(packing, 40) + 60
    assert 100 < np.percentile(image[label == 1], 50) < 220
    stored, grid = stored_chunks(scroll)
    assert stored < grid  # the air in the corners is never stored
    # The label is a spiral: in a slice, one connected curve that crosses a ray from the axis many times.
    from scipy import ndimage

    middle = label[48]
    components, _ = ndimage.label(middle, structure=np.ones((3, 3)))
    assert np.bincount(components.ravel())[1:].max() > 0.95 * middle.sum()
    assert np.count_nonzero(np.diff(middle[64, 64:].astype(int)) == 1) >= 3


def test_synthetic_scroll_is_deterministic_and_independent_of_the_blocks(scroll, tmp_path):
    whole = (slice(0, 96), slice(0, 128), slice(0, 128))
    other = write_scroll_zarr(tmp_path / "again.zarr", (96, 128, 128), seed=3, chunks=(32, 64, 64),
                              zarr_format=3, shard=(32, 64, 128), progress=False)
    assert np.array_equal(open_volume(other).read(whole), open_volume(scroll).read(whole))
    assert np.array_equal(open_volume(other / "labels" / LABEL_NAME).read(whole),
                          open_volume(scroll / "labels" / LABEL_NAME).read(whole))
    # One block regenerated on its own equals the stored voxels.
    style, geometry = scroll_parameters((96, 128, 128), 3)
    box = (slice(16, 32), slice(32, 64), slice(64, 96))
    block, block_label = render_block(box, style, geometry)
    assert np.array_equal(block, open_volume(scroll).read(box))
    assert np.array_equal(block_label, open_volume(scroll / "labels" / LABEL_NAME).read(box))
    seed_4 = write_scroll_zarr(tmp_path / "seed4.zarr", (24, 40, 40), seed=4, progress=False)
    seed_3 = write_scroll_zarr(tmp_path / "seed3.zarr", (24, 40, 40), seed=3, progress=False)
    part = (slice(0, 24), slice(0, 40), slice(0, 40))
    assert not np.array_equal(open_volume(seed_4).read(part), open_volume(seed_3).read(part))


def _peak_traced_bytes(path: Path, shape) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        write_scroll_zarr(path, shape, chunks=(32, 32, 32), block_voxels=32 ** 3, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_synthetic_scroll_memory_does_not_grow_with_the_volume(tmp_path):
    """Peak traced allocations (numpy arrays included) for a volume 4x deeper stay the same: a block at a
    time is held, never the volume (the extra depth alone is 1.3 MiB of uint8)."""
    small = _peak_traced_bytes(tmp_path / "small.zarr", (48, 96, 96))
    large = _peak_traced_bytes(tmp_path / "large.zarr", (192, 96, 96))
    assert large < small + 2 ** 19, (small, large)


def test_cli_writes_a_synthetic_scroll_zarr_and_refuses_a_foreign_path(tmp_path, capsys):
    runner = CliRunner()
    made = runner.invoke(cli, ["data", "synth", "--zarr", str(tmp_path / "s.zarr"), "--shape", "16", "40", "40"])
    assert made.exit_code == 0, made.output
    assert "s.zarr" in made.output and "chunks stored" in made.output
    assert open_volume(tmp_path / "s.zarr").shape == (16, 40, 40)
    again = runner.invoke(cli, ["data", "synth", "--zarr", str(tmp_path / "s.zarr"), "--shape", "16", "40", "40",
                                "--seed", "1"])
    assert again.exit_code == 0, again.output  # a volume it wrote is replaced
    foreign = _zarr_array(tmp_path / "foreign.zarr", _volume(), 2)
    with pytest.raises(SystemExit) as status:
        main(["data", "synth", "--zarr", str(foreign), "--shape", "16", "40", "40"])
    printed = capsys.readouterr().err
    assert status.value.code == 2 and "not written by" in printed and "Traceback" not in printed
    assert np.array_equal(open_volume(foreign).read(WHOLE), _volume())
