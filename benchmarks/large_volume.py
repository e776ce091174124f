"""Whole volumes, block by block: memory that does not grow with the volume, throughput against the
in-memory sliding window, the compute that halos repeat, the share of blocks skipped, resume overhead.

For each size (0.25 G and 1 G voxels by default) a synthetic scroll OME-Zarr is written (`vlab data synth
--zarr`), then predicted by `vlab predict RUN --input X --output Y.zarr --probabilities` with the default block, each in
its own process whose peak resident memory is read from the kernel (wait4). Then:

- the same command with --resume on the finished output (what a rerun costs when nothing is left);
- the compute halos repeat: the windows all blocks predict over the windows the whole volume has;
- throughput against the peer: a cube cut from the scroll (side --reference, all scroll) predicted in
  memory by `sliding_window` (through the run, as `vlab predict` does for a TIFF) and block-wise with
  the default block and no support mask, in the same process, voxels per second of each;
- `--jobs 2` against one process, both with blocks of --jobs-block (several blocks to share), the two
  outputs checked equal bit for bit;
- the global pass: the run's global chain steps over the predicted probabilities (as the stage the blocks
  write), on a local dask cluster of --pass-workers processes: its time and each worker's peak memory.

    python benchmarks/large_volume.py --run quick-unet25d                   # trains nothing: give a run
    python benchmarks/large_volume.py --run quick-unet25d --sizes 0.25 --reference 256   # quicker
    python benchmarks/large_volume.py --run quick-unet25d --sizes 0.25 --no-jobs         # no --jobs 2 run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import _summary
from _process import measured, vlab

SHAPES = {"0.01": (128, 256, 256), "0.25": (256, 1024, 1024), "1": (1024, 1024, 1024)}  # 0.01: a quick try


def block_counts(output: Path) -> tuple[int, int]:
    records = [json.loads(p.read_text()) for p in (output / ".vlab" / "done").glob("*.json")]
    return sum(r["predicted"] for r in records), sum(not r["predicted"] for r in records)


def halo_repeat(run: Path, shape) -> tuple[int, float]:
    """(blocks, windows of all blocks / windows of the whole volume) with the default block."""
    from vesuvius_lab.core.inference.blocks import BlockPlan, Box, halo_windows
    from vesuvius_lab.core.inference.run_kinds import load_run
    from vesuvius_lab.core.inference.volume_predict import DEFAULT_CHUNK, default_block

    spec = load_run(run).spec
    block = default_block(spec.inference, spec.inference_window, DEFAULT_CHUNK, None)
    plan = BlockPlan(tuple(shape), Box.of_shape(shape), block)
    blocks = sum(halo_windows(b.core, shape, spec.inference, spec.inference_window) for b in plan.blocks())
    return len(plan), blocks / halo_windows(Box.of_shape(shape), shape, spec.inference, spec.inference_window)


def reference_cube(scroll: Path, side: int, folder: Path) -> Path:
    """A cube of the scroll's middle (all papyrus) as its own zarr, for the in-memory peer."""
    import zarr

    from vesuvius_lab.core.data.volumes import open_volume

    source = open_volume(scroll)
    middle = [n // 2 for n in source.shape]
    box = tuple(slice(max(0, m - side // 2), max(0, m - side // 2) + min(side, n)) for m, n in zip(middle, source.shape))
    cube = source.read(box)
    path = folder / "cube.zarr"
    shutil.rmtree(path, ignore_errors=True)  # a --workdir used before
    array = zarr.create_array(path, shape=cube.shape, chunks=(128, 128, 128), dtype="uint8", zarr_format=2)
    array[:] = cube
    return path


def peer_ratio(run: Path, cube: Path, folder: Path) -> dict:
    """Voxels per second: sliding_window in memory against blocks (default block, no support mask)."""
    from vesuvius_lab.core.data.volumes import open_volume
    from vesuvius_lab.core.inference.run_kinds import load_run

    from vesuvius_lab.core.inference.volume_predict import VolumeRequest, pending_blocks, prepare, thread_independent
    from vesuvius_lab.core.launch.predict_jobs import predict_here

    source = open_volume(cube)
    volume = source.read(tuple(slice(0, n) for n in source.shape))
    predictor = load_run(run)
    started = time.perf_counter()
    predictor.probabilities(volume)
    onednn = time.perf_counter() - started
    started = time.perf_counter()
    with thread_independent():  # the convolutions blocks use by default
        predictor.probabilities(volume)
    in_memory = time.perf_counter() - started

    request = VolumeRequest(input=str(cube), output=folder / "cube-out.zarr", probabilities=True, support="none",
                            force=True)
    started = time.perf_counter()
    prepared = prepare(predictor, request)  # reading from and writing to zarr included, the pyramid not
    predict_here(prepared, pending_blocks(prepared), on_block=lambda *done: None)
    blocks = time.perf_counter() - started
    return {"voxels": volume.size, "in_memory_s": in_memory, "blocks_s": blocks, "blocks": len(prepared.plan),
            "onednn_s": onednn}


def same_levels(first: Path, second: Path) -> bool:
    import numpy as np
    import zarr

    a, b = zarr.open_group(first, mode="r"), zarr.open_group(second, mode="r")
    return all(np.array_equal(a[str(k)][:], b[str(k)][:]) for k in range(6))


def global_pass(run: Path, probabilities: Path, folder: Path, workers: int, top: float = 255) -> dict:
    """The run's global chain steps over the probabilities the blocks wrote (as the stage would hold them; level 0
    of ``probabilities`` divided by ``top``): seconds, and each dask worker's peak MiB."""
    import dask.array as da
    import numpy as np

    from vesuvius_lab.core.data.ome_output import OmeZarrOutput
    from vesuvius_lab.core.inference.blocks import Box
    from vesuvius_lab.core.inference.global_pass import create_stage, run_global_pass, split_chain, stage_path
    from vesuvius_lab.core.inference.run_kinds import load_run

    chain = load_run(run).chain
    local, rest = split_chain(chain)
    if not rest:
        return {}
    source = da.from_zarr(str(probabilities / "0"))
    target = folder / f"pass-{probabilities.parent.name}-{probabilities.name}.zarr"
    shutil.rmtree(target, ignore_errors=True)  # a --workdir used before
    output = OmeZarrOutput.create(target, shape=source.shape, chunks=(128,) * 3)
    create_stage(output.path, source.shape, (128,) * 3, np.float32)
    import zarr

    stage = zarr.open_array(str(stage_path(output.path)), mode="r+")
    (source.astype(np.float32) / np.float32(top)).store(stage, lock=False)  # local steps: none in the quick chains
    started = time.perf_counter()
    peaks = run_global_pass(output.path, output.level0, output.write_unit, Box.of_shape(source.shape), rest,
                            chain.threshold, workers=workers)
    return {"seconds": time.perf_counter() - started, "steps": [s.label for s in rest], "local": [s.label for s in local],
            "worker_mib": sorted(peaks.values())}


def jobs_comparison(run: Path, scroll: Path, folder: Path, size: str, block: str, summary: list) -> tuple:
    """`--jobs 1` against `--jobs 2` over the same blocks: (size, seconds of each, peak MiB of a --jobs 2
    process, outputs equal)."""
    timed = {}
    for jobs in (1, 2):
        target = folder / f"surface-{size}-jobs{jobs}.zarr"
        shutil.rmtree(target, ignore_errors=True)
        timed[jobs] = measured(vlab("predict", str(run), "--input", str(scroll), "--output", str(target),
                                    "--probabilities", "--block", block, "--jobs", str(jobs)))
    same = same_levels(folder / f"surface-{size}-jobs1.zarr", folder / f"surface-{size}-jobs2.zarr")
    summary.append(_summary.row("large_volume", f"--jobs 2, {size} G voxels", timed[2][0], "s",
                                peer=timed[1][0], peer_name="--jobs 1"))
    return size, timed[1][0], timed[2][0], timed[2][1], same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder or experiment name (e.g. quick-unet25d)")
    parser.add_argument("--sizes", nargs="+", default=["0.25", "1"], choices=sorted(SHAPES), help="G voxels")
    parser.add_argument("--reference", type=int, default=320, help="side of the in-memory peer's cube")
    parser.add_argument("--workdir", help="where the volumes go (default: a temporary folder, removed after)")
    parser.add_argument("--no-jobs", action="store_true", help="skip the --jobs 1 / --jobs 2 comparison")
    parser.add_argument("--only-pass-on-label", action="store_true", help="only the global pass, over the scroll's "
                        "own label (labels/surface) taken as probabilities: no prediction needed (a scroll already in "
                        "--workdir is used as it is)")
    parser.add_argument("--only-jobs", action="store_true", help="only the --jobs 1 / --jobs 2 comparison (a scroll "
                        "already in --workdir is used as it is)")
    parser.add_argument("--jobs-block", default="128,512,512", help="the block of the --jobs comparison")
    parser.add_argument("--pass-workers", type=int, default=2, help="dask workers of the global pass")
    _summary.add_argument(parser)
    args = parser.parse_args()

    from vesuvius_lab.core.config.project import load_project
    from vesuvius_lab.core.runs.records import resolve_run

    run = resolve_run(args.run, load_project(None).runs_dir).path
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="vlab-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows, summary, jobs_rows, pass_rows = [], [], [], []
    try:
        for size in args.sizes:
            shape = SHAPES[size]
            scroll, out = folder / f"scroll-{size}.zarr", folder / f"surface-{size}.zarr"
            if args.only_pass_on_label:
                if not any((scroll / marker).is_file() for marker in ("zarr.json", ".zattrs")):
                    measured(vlab("data", "synth", "--zarr", str(scroll), "--shape", *map(str, shape)))
                passed = global_pass(run, scroll / "labels" / "surface", folder, args.pass_workers, top=1)
                pass_rows.append((size, passed))
                continue
            if args.only_jobs:
                if not any((scroll / marker).is_file() for marker in ("zarr.json", ".zattrs")):
                    measured(vlab("data", "synth", "--zarr", str(scroll), "--shape", *map(str, shape)))
                jobs_rows.append(jobs_comparison(run, scroll, folder, size, args.jobs_block, summary))
                continue
            write_s, write_mib = measured(vlab("data", "synth", "--zarr", str(scroll), "--shape", *map(str, shape)))
            shutil.rmtree(out, ignore_errors=True)
            # Probabilities: the quick models' chains hold global steps (connected components), which need
            # the pass over the whole written output, not blocks.
            predict = vlab("predict", str(run), "--input", str(scroll), "--output", str(out), "--probabilities")
            predict_s, predict_mib = measured(predict)
            resume_s, _ = measured(predict + ["--resume"])
            predicted, empty = block_counts(out)
            blocks, repeat = halo_repeat(run, shape)
            voxels = math.prod(shape)
            rows.append((size, shape, write_s, write_mib, predict_s, predict_mib, voxels / predict_s, predicted,
                         empty, repeat, resume_s))
            if not args.no_jobs:
                jobs_rows.append(jobs_comparison(run, scroll, folder, size, args.jobs_block, summary))
            passed = global_pass(run, out, folder, args.pass_workers)
            if passed:
                pass_rows.append((size, passed))
                summary.append(_summary.row("large_volume", f"global pass, {size} G voxels", passed["seconds"], "s"))
                summary.append(_summary.row("large_volume", f"global pass peak memory per worker, {size} G voxels",
                                            max(passed["worker_mib"]), "MiB"))
            summary.append(_summary.row("large_volume", f"peak memory, {size} G voxels", predict_mib, "MiB"))
            summary.append(_summary.row("large_volume", f"skipped blocks, {size} G voxels", empty / (predicted + empty),
                                        "share"))
        if not args.only_jobs:
            cube = reference_cube(folder / f"scroll-{args.sizes[0]}.zarr", args.reference, folder)
            peer = peer_ratio(run, cube, folder)
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"run {run}, {os.cpu_count()} CPU core(s), torch threads as set by OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if rows:
        print("| volume (G voxels) | shape | write s | write peak MiB | predict s | predict peak MiB | voxels/s | "
              "blocks predicted | blocks skipped | windows repeated by halos | --resume s (all done) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, shape, write_s, write_mib, predict_s, predict_mib, rate, predicted, empty, repeat, resume_s in rows:
        print(f"| {size} | {'x'.join(map(str, shape))} | {write_s:.0f} | {write_mib:.0f} | {predict_s:.0f} | "
              f"{predict_mib:.0f} | {rate / 1e6:.2f} M | {predicted} | {empty} | {repeat - 1:+.1%} | {resume_s:.1f} |")
    if jobs_rows:
        print(f"\n--jobs, blocks of {args.jobs_block}:")
        print("| volume (G voxels) | --jobs 1 s | --jobs 2 s | speed-up | --jobs 2 peak MiB of a process | same output |")
        print("|---|---|---|---|---|---|")
        for size, one_s, two_s, two_mib, same in jobs_rows:
            print(f"| {size} | {one_s:.0f} | {two_s:.0f} | {one_s / two_s:.2f}x | {two_mib:.0f} | {'yes' if same else 'NO'} |")
    for size, passed in pass_rows:
        print(f"\nglobal pass, {size} G voxels: {', '.join(passed['steps'])} in {passed['seconds']:.0f} s on "
              f"{len(passed['worker_mib'])} dask worker(s), peak {', '.join(f'{m:.0f}' for m in passed['worker_mib'])} "
              "MiB per worker")
    if args.only_jobs or args.only_pass_on_label:
        _summary.write(args.summary, summary)
        return
    ratio = peer["in_memory_s"] / peer["blocks_s"]
    print(f"\nthroughput on a {round(peer['voxels'] ** (1 / 3))}^3 cube of scroll, both with the thread-independent "
          f"convolutions blocks use: in memory {peer['voxels'] / peer['in_memory_s'] / 1e6:.2f} M voxels/s "
          f"(sliding_window), blocks {peer['voxels'] / peer['blocks_s'] / 1e6:.2f} M voxels/s ({peer['blocks']} "
          f"block(s), zarr in and out): {ratio:.2f}x (goal >= 0.9x)")
    print(f"in memory with oneDNN's convolutions (--onednn): {peer['voxels'] / peer['onednn_s'] / 1e6:.2f} M voxels/s, "
          f"{peer['in_memory_s'] / peer['onednn_s']:.2f}x faster than the thread-independent ones")
    summary.append(_summary.row("large_volume", "throughput, blocks / in memory", peer["voxels"] / peer["blocks_s"],
                                "voxels/s", peer=peer["voxels"] / peer["in_memory_s"], peer_name="sliding_window",
                                target=">= 0.9"))
    _summary.write(args.summary, summary)


if __name__ == "__main__":
    main()
