"""Held-out quality of a quick experiment: train it as `make demo` does, then score it on synthetic
volumes of other seeds that it never saw, against an empty mask as the floor.

    .venv/bin/python benchmarks/heldout.py [--experiment experiments/quick/unet25d.toml] [--seeds 101 202]
                                           [--run RUN_DIR] [--summary FILE]

Prints the training wall time and, per held-out seed, the mean score, TopoScore, SurfaceDice and
VOI score of the run's predictions (its own post-processing chain) and of an empty mask.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _summary
import numpy as np
from rich.console import Console
from rich.table import Table

from vesuvius_lab.core.data.synthetic import write_dataset
from vesuvius_lab.core.data.tiff import read_volume, write_volume

KEYS = ("score", "topo_score", "surface_dice", "voi_score")


def vlab(*args: str, data: Path, runs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLAB_DATA": str(data), "VLAB_RUNS": str(runs)}
    result = subprocess.run([sys.executable, "-m", "vesuvius_lab", *args], env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"vlab {' '.join(args)} failed:\n{result.stderr}")
    return result


def mean_scores(evaluated: str) -> dict[str, float]:
    volumes = json.loads(evaluated)["volumes"]
    return {key: statistics.fmean(v[key] for v in volumes) for key in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/quick/unet25d.toml")
    parser.add_argument("--run", help="score this trained run instead of training the experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 202], help="seeds of the held-out data")
    parser.add_argument("--n", type=int, default=4, help="held-out volumes per seed")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128))
    _summary.add_argument(parser)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_data = write_dataset(tmp / "data", progress=False)  # what `make demo` trains on
        runs = tmp / "runs"
        wall = None
        if args.run:
            run = Path(args.run).resolve()
        else:
            started = time.perf_counter()
            vlab("train", args.experiment, data=train_data, runs=runs)
            wall = time.perf_counter() - started
            (run,) = [p.parent for p in runs.glob("*/*/spec.json")]
        rows = []
        for seed in args.seeds:
            held = write_dataset(tmp / f"held-{seed}", n=args.n, shape=tuple(args.shape), seed=seed, n_test=1,
                                 progress=False)
            vlab("predict", str(run), "--input", str(held / "train_images"), "--output", str(tmp / f"pred-{seed}"),
                 data=train_data, runs=runs)
            model = mean_scores(vlab("evaluate", str(tmp / f"pred-{seed}"), str(held / "train_labels"), "--json",
                                     data=train_data, runs=runs).stdout)
            empty_dir = tmp / f"empty-{seed}"
            empty_dir.mkdir()
            for label in sorted((held / "train_labels").glob("*.tif")):
                write_volume(empty_dir / label.name, np.zeros_like(read_volume(label)))
            empty = mean_scores(vlab("evaluate", str(empty_dir), str(held / "train_labels"), "--json",
                                     data=train_data, runs=runs).stdout)
            rows.append((seed, model, empty))
    table = Table(title=f"held-out synthetic volumes: {args.experiment if not args.run else args.run}"
                        + (f", trained in {wall:.0f} s" if wall else ""))
    for column in ("seed", "score", "TopoScore", "SurfaceDice", "VOI", "empty mask score", "empty TopoScore"):
        table.add_column(column, justify="right")
    for seed, model, empty in rows:
        table.add_row(str(seed), *(f"{model[k]:.4f}" for k in KEYS), f"{empty['score']:.4f}", f"{empty['topo_score']:.4f}")
    means = {k: statistics.fmean(m[k] for _, m, _ in rows) for k in KEYS}
    table.add_row("mean", *(f"{means[k]:.4f}" for k in KEYS), "", "")
    console.print(table)
    _summary.write(args.summary, [_summary.row(
        "heldout", f"held-out score, {args.experiment}", means["score"], "score",
        peer=statistics.fmean(e["score"] for _, _, e in rows), peer_name="empty mask", target="score >= 0.55",
        note=f"TopoScore {means['topo_score']:.3f}; seeds {args.seeds}; trained in {wall:.0f} s" if wall else None)])


if __name__ == "__main__":
    main()
