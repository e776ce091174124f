"""Training at the competition's data scale: start-up, peak memory and throughput against the number of volumes.

One synthetic dataset of the largest size is written (`vlab data synth`, all cores; its time per volume is
printed), and the smaller ones are its first volumes (links to the same files). For each size, the quick 2.5D
experiment (experiments/quick/unet25d.toml, fold "all": no validation, one epoch of --iterations) is trained
twice by `vlab train` in a process of its own:

- cold: the first run on the dataset, which decodes every volume into the cache once (and counts its labels);
- warm: every later run, the one a user waits for each time: the cache holds every volume, and each entry's
  checksum is trusted through its stamp (core/data/array_cache.py), so nothing is read before training.

Printed per size and run: start-up (the command's wall time minus its epoch, which the trainer times from its
first batch), peak resident memory of the training process (wait4), and samples per second; then the warm
run's ratios against the smallest size (goals: start-up within 1.5x, memory within 1.2x, throughput within
10%). Last, `vlab data check` on the largest dataset: its time and peak memory.

    python benchmarks/scale.py                               # 8, 64 and 256 volumes of 320^3 (disk: ~50 GB)
    python benchmarks/scale.py --side 160 --workdir /tmp/scale   # 8x fewer voxels per volume
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import _summary
from _process import measured, vlab

from vesuvius_lab.core.children import usable_cpus

REPO = Path(__file__).resolve().parent.parent


def subset(full: Path, folder: Path, n: int) -> Path:
    """The first ``n`` training volumes of ``full`` (links to its files) and its test volumes, as a dataset."""
    shutil.rmtree(folder, ignore_errors=True)
    lines = (full / "train.csv").read_text().splitlines()
    for name in ("train_images", "train_labels", "test_images"):
        (folder / name).mkdir(parents=True)
    for line in lines[1:n + 1]:
        volume_id = line.split(",")[0]
        for name in ("train_images", "train_labels"):
            (folder / name / f"{volume_id}.tif").symlink_to(full / name / f"{volume_id}.tif")
    for path in (full / "test_images").iterdir():
        (folder / "test_images" / path.name).symlink_to(path)
    (folder / "train.csv").write_text("\n".join(lines[:n + 1]) + "\n")
    shutil.copy(full / "test.csv", folder / "test.csv")
    return folder


def train(data: Path, runs: Path, iterations: int) -> dict:
    """One `vlab train` of the quick 2.5D experiment on ``data``: start-up s, peak MiB, samples/s."""
    env = {**os.environ, "VLAB_DATA": str(data), "VLAB_RUNS": str(runs)}
    seconds, mib = measured(vlab("train", str(REPO / "experiments" / "quick" / "unet25d.toml"),
                                    "--set", 'data.fold="all"', "--set", "train.epochs=1",
                                    "--set", f"train.iterations_per_epoch={iterations}"), env)
    newest = max((runs / "quick-unet25d").iterdir(), key=lambda path: path.stat().st_mtime)
    (record,) = [json.loads(line) for line in (newest / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "startup_s": seconds - record["time_s"], "mib": mib,
            "samples_per_s": record["samples_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 256], help="training volumes per dataset")
    parser.add_argument("--side", type=int, default=320, help="volume side (320: the competition's)")
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per run")
    parser.add_argument("--workdir", help="where the datasets and runs go (default: a temporary folder, removed "
                        "after); a dataset written there before is reused")
    _summary.add_argument(parser)
    args = parser.parse_args()

    folder = Path(args.workdir or tempfile.mkdtemp(prefix="vlab-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    largest, side = max(args.sizes), args.side
    needed = largest * 2 * side ** 3 * 2.3  # images, labels and their decoded cache entries, with some room
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise SystemExit(f"{folder}: {free / 2**30:.0f} GiB free, about {needed / 2**30:.0f} GiB needed for "
                         f"{largest} volumes of {side}^3; give a smaller --side or another --workdir.")
    rows, summary = [], []
    try:
        full = folder / f"data-{largest}-{side}"
        marker = full / "train.csv"
        synth_s = None
        if not (marker.is_file() and len(marker.read_text().splitlines()) == largest + 1):
            synth_s, _ = measured(vlab("data", "synth", "--out", str(full), "--n", str(largest), "--shape",
                                          str(side), str(side), str(side), "--test", "1"))
        for n in sorted(args.sizes):
            data = full if n == largest else subset(full, folder / f"data-{n}-{side}", n)
            runs = folder / f"runs-{n}-{side}"
            shutil.rmtree(runs, ignore_errors=True)
            cold = train(data, runs, args.iterations)
            warm = train(data, runs, args.iterations)
            rows.append((n, cold, warm))
        check_s, check_mib = measured(vlab("data", "check", str(full)))
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)

    cores = len(usable_cpus())
    print(f"volumes of {side}^3, {cores} CPU core(s), {args.iterations} iterations of the quick 2.5D experiment")
    if synth_s is not None:
        print(f"vlab data synth: {largest + 1} volumes in {synth_s:.0f} s ({synth_s / (largest + 1):.2f} s per volume "
              f"on {cores} core(s))")
    print("| volumes | run | start-up s | peak MiB | samples/s |")
    print("|---|---|---|---|---|")
    for n, cold, warm in rows:
        for label, run in (("cold", cold), ("warm", warm)):
            print(f"| {n} | {label} | {run['startup_s']:.1f} | {run['mib']:.0f} | {run['samples_per_s']:.1f} |")
    base = rows[0][2]
    for n, _, warm in rows[1:]:
        startup, memory = warm["startup_s"] / base["startup_s"], warm["mib"] / base["mib"]
        rate = warm["samples_per_s"] / base["samples_per_s"]
        print(f"warm, {n} against {rows[0][0]} volumes: start-up {startup:.2f}x (goal <= 1.5x), memory {memory:.2f}x "
              f"(goal <= 1.2x), throughput {rate:.2f}x (goal 0.9-1.1x)")
        summary += [_summary.row("scale", f"start-up, {n} volumes", warm["startup_s"], "s", peer=base["startup_s"],
                                 peer_name=f"{rows[0][0]} volumes", target="<= 1.5"),
                    _summary.row("scale", f"peak memory, {n} volumes", warm["mib"], "MiB", peer=base["mib"],
                                 peer_name=f"{rows[0][0]} volumes", target="<= 1.2"),
                    _summary.row("scale", f"throughput, {n} volumes", warm["samples_per_s"], "samples/s",
                                 peer=base["samples_per_s"], peer_name=f"{rows[0][0]} volumes", target="0.9-1.1")]
    print(f"vlab data check on {largest} volumes: {check_s:.0f} s, peak {check_mib:.0f} MiB")
    summary.append(_summary.row("scale", f"vlab data check, {largest} volumes", check_s, "s"))
    _summary.write(args.summary, summary)


if __name__ == "__main__":
    main()
