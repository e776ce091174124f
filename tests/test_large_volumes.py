"""`vlab predict RUN --input VOLUME --output OUT.zarr`: exact, resumable, block-wise prediction of volumes of
any size, checked against the whole volume predicted in memory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from vesuvius_lab.cli import main
from vesuvius_lab.core.data.synthetic_zarr import stored_chunks, write_scroll_zarr
from vesuvius_lab.core.data.volumes import open_volume
from vesuvius_lab.core.inference.run_kinds import load_run

SCROLL_SHAPE = (40, 72, 68)  # multiples of nothing the blocks or chunks use
SMALL = ["--chunk", "16", "--block", "32"]


@pytest.fixture(scope="module")
def scroll(tmp_path_factory) -> Path:
    """A scroll-like OME-Zarr with air around it, in 16^3 chunks."""
    return write_scroll_zarr(tmp_path_factory.mktemp("scroll") / "scroll.zarr", SCROLL_SHAPE, seed=3,
                             chunks=(16, 16, 16), progress=False)


@pytest.fixture(scope="module")
def volume(scroll) -> np.ndarray:
    source = open_volume(scroll)
    return source.read(tuple(slice(0, n) for n in source.shape))


@pytest.fixture(scope="module")
def dilating_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run whose chain dilates its mask: a local step with a halo of 1."""
    runs = tmp_path_factory.mktemp("runs")
    copy = runs / "tiny-dilated" / Path(tiny_run).name
    shutil.copytree(tiny_run, copy)
    spec = json.loads((copy / "spec.json").read_text())
    spec["name"], spec["postprocess"] = "tiny-dilated", [{"plugin": "dilate", "params": {"radius": 1}}]
    (copy / "spec.json").write_text(json.dumps(spec))
    return copy


def predict(run: Path, source, output: Path, *options: str) -> int:
    try:
        main(["--device", "cpu", "predict", str(run), "--input", str(source), "--output", str(output), *options])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def level(output: Path, index: int = 0) -> np.ndarray:
    return zarr.open_group(output, mode="r")[str(index)][:]


def test_a_mask_with_a_local_chain_equals_the_whole_volume_chain(dilating_run, scroll, volume, tmp_path):
    out = tmp_path / "mask.zarr"
    assert predict(dilating_run, scroll, out, *SMALL) == 0
    predictor = load_run(dilating_run)
    probabilities = predictor.probabilities(volume)
    probabilities[volume == 0] = 0  # --support-mask auto: nothing outside the scroll
    expected = predictor.chain.apply(probabilities) * 255
    assert expected.any() and np.array_equal(level(out), expected)
    stored, grid = stored_chunks(out)
    assert stored < grid  # air is never stored


def test_a_bbox_equals_the_whole_run_inside_and_leaves_the_rest_empty(dilating_run, scroll, tmp_path):
    whole, box = tmp_path / "whole.zarr", tmp_path / "box.zarr"
    assert predict(dilating_run, scroll, whole, *SMALL) == 0
    assert predict(dilating_run, scroll, box, *SMALL, "--bbox", "5:33,17:60,:40") == 0
    inside = (slice(5, 33), slice(17, 60), slice(0, 40))
    assert np.array_equal(level(box)[inside], level(whole)[inside])
    outside = level(box).copy()
    outside[inside] = 0
    assert not outside.any()


def test_probabilities_without_a_support_mask_are_the_sliding_window_s(tiny_run, scroll, volume, tmp_path):
    out = tmp_path / "p.zarr"
    assert predict(tiny_run, scroll, out, "--probabilities", "--support-mask", "none", "--chunk", "16",
                   "--block", "16,32,48") == 0
    expected = np.rint(load_run(tiny_run).probabilities(volume) * 255)
    difference = np.abs(level(out).astype(int) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # only a rounding at .5 may flip
    attrs = zarr.open_group(out, mode="r").attrs.asdict()
    assert attrs["vesuvius_lab"]["output"] == "probabilities" and attrs["vesuvius_lab"]["run"] == str(tiny_run)


def test_the_output_reads_back_through_ome_zarr_py_with_its_levels_and_meta_json(tiny_run, scroll, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = tmp_path / "read.zarr"
    assert predict(tiny_run, scroll, out, *SMALL) == 0
    (node, *_) = Reader(parse_url(str(out)))()
    shapes = [tuple(level.shape) for level in node.data]
    assert shapes[0] == SCROLL_SHAPE and len(shapes) == 6
    assert shapes[1] == tuple(-(-n // 2) for n in SCROLL_SHAPE)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["slices"], meta["height"], meta["width"]) == SCROLL_SHAPE and meta["type"] == "vol"
    assert set(np.unique(level(out))) <= {0, 255}


def test_zarr_v3_with_shards_gives_the_v2_values(tiny_run, scroll, tmp_path):
    v2, v3 = tmp_path / "v2.zarr", tmp_path / "v3.zarr"
    assert predict(tiny_run, scroll, v2, "--chunk", "16", "--block", "32") == 0
    assert predict(tiny_run, scroll, v3, "--chunk", "16", "--shard", "32", "--block", "32", "--zarr-format", "3") == 0
    assert (v3 / "zarr.json").is_file()
    assert np.array_equal(level(v2), level(v3))


def _blocks_done(output: Path) -> int:
    return len(list((output / ".vlab" / "done").glob("*.json")))


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_blocks(process: subprocess.Popen, output: Path, count: int) -> None:
    deadline = time.monotonic() + 300
    while _blocks_done(output) < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]


def test_stopped_by_sigterm_and_killed_by_sigkill_then_resumed_it_equals_an_uninterrupted_run(tiny_run, scroll,
                                                                                            tmp_path):
    options = ["--chunk", "16", "--block", "16", "--support-mask", "none"]
    whole = tmp_path / "whole.zarr"
    assert predict(tiny_run, scroll, whole, *options) == 0
    total = _blocks_done(whole)
    resumed = tmp_path / "resumed.zarr"
    command = [sys.executable, "-m", "vesuvius_lab", "--device", "cpu", "predict", str(tiny_run), "--input",
               str(scroll), "--output", str(resumed), *options]

    process = _start(command)  # SIGTERM: the block in flight is finished and recorded, then exit 143
    _wait_for_blocks(process, resumed, 2)
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 143 and "--resume" in error, error
    stopped = _blocks_done(resumed)
    assert 2 <= stopped < total

    process = _start(command + ["--resume"])  # SIGKILL: only the block in flight is lost
    _wait_for_blocks(process, resumed, stopped + 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = _blocks_done(resumed)
    assert stopped + 2 <= killed < total

    assert predict(tiny_run, scroll, resumed, *options) == 2  # exists: --resume or --force, nothing changed
    assert _blocks_done(resumed) == killed
    assert predict(tiny_run, scroll, resumed, *options, "--resume") == 0
    for index in range(6):
        assert np.array_equal(level(resumed, index), level(whole, index)), index


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def odd_arrays(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    flat = zarr.create_array(root / "flat.zarr", shape=(40, 40), chunks=(16, 16), dtype="uint8", zarr_format=2)
    flat[:] = 1
    wide = zarr.create_array(root / "int64.zarr", shape=(20, 20, 20), chunks=(16,) * 3, dtype="int64", zarr_format=2)
    wide[:] = 1
    return {"flat": root / "flat.zarr", "int64": root / "int64.zarr"}


@pytest.mark.parametrize("case, options, message", [
    ("level", ["--level", "9"], "level"),
    ("bbox", ["--bbox", "0:10,0:10,0:500"], "not inside the volume"),
    ("block", ["--chunk", "16", "--block", "24"], "multiple of the output's chunk"),
    ("rank", [], "3D|rank|dimension"),
    ("dtype", [], "int64|uint8"),
    ("url", [], "127.0.0.1"),
    ("zarr-only", ["--bbox", "0:4,0:4,0:4"], "give --output OUT.zarr"),
])
def test_bad_inputs_exit_2_with_a_message_before_any_output(case, options, message, tiny_run, scroll, odd_arrays,
                                                             tmp_path, capsys):
    source = {"rank": odd_arrays["flat"], "dtype": odd_arrays["int64"],
              "url": f"http://127.0.0.1:{_closed_port()}/scroll.zarr"}.get(case, scroll)
    out = tmp_path / ("folder" if case == "zarr-only" else "out.zarr")
    assert predict(tiny_run, source, out, *options) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert __import__("re").search(message, error), error
    assert not out.exists()


def test_an_output_of_other_settings_is_refused_and_kept_and_force_starts_over(dilating_run, tiny_run, scroll,
                                                                              tmp_path, capsys):
    out = tmp_path / "kept.zarr"
    assert predict(tiny_run, scroll, out, *SMALL, "--bbox", "0:16,:,:") == 0
    before = level(out).copy()
    done = sorted(p.name for p in (out / ".vlab" / "done").iterdir())
    for options in (["--probabilities", "--resume"], ["--resume"]):
        run = tiny_run if options[0] == "--probabilities" else dilating_run
        assert predict(run, scroll, out, *SMALL, *options) == 2
        assert "other settings" in capsys.readouterr().err
        assert np.array_equal(level(out), before)
        assert sorted(p.name for p in (out / ".vlab" / "done").iterdir()) == done
    assert predict(dilating_run, scroll, out, *SMALL, "--force") == 0
    assert json.loads((out / ".vlab" / "plan.json").read_text())["parts"]["chain"][0]["plugin"] == "dilate"


def test_force_never_removes_a_folder_that_is_not_an_output(tiny_run, scroll, tmp_path, capsys):
    foreign = tmp_path / "mine.zarr"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert predict(tiny_run, scroll, foreign, *SMALL, "--force") == 2
    assert "not" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"


def test_a_volume_served_over_http_predicts_as_the_local_one(tiny_run, scroll, tmp_path):
    """A real HTTP server on 127.0.0.1 serves the scroll's folder; the prediction read through it equals
    the local one (the ROI of a remote scroll, as users predict them)."""
    import functools
    import http.server
    import threading

    from test_volumes import _RangeHandler  # Python's file server with byte ranges, as object stores serve

    handler = functools.partial(_RangeHandler, directory=str(scroll.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{scroll.name}"
        local, remote = tmp_path / "local.zarr", tmp_path / "remote.zarr"
        assert predict(tiny_run, scroll, local, *SMALL, "--bbox", "8:40,16:48,:") == 0
        assert predict(tiny_run, url, remote, *SMALL, "--bbox", "8:40,16:48,:") == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    assert level(local).any() and np.array_equal(level(remote), level(local))
    assert zarr.open_group(remote, mode="r").attrs["vesuvius_lab"]["input"]["location"] == url
