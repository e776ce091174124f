"""Post-processing steps on a competition-sized volume: seconds per step.

The input is a synthetic float32 prediction of the given size: three wavy sheets with noise,
so that thresholding leaves sheets, dust and holes to work on. Each step runs on the
probabilities (mask steps threshold them first at 0.5); the best time of the repeats is
printed. Target: a few seconds at most per step on 320^3.

    OMP_NUM_THREADS=1 python benchmarks/postprocess.py              # 320^3
    OMP_NUM_THREADS=1 python benchmarks/postprocess.py --size 128   # a quick run

The last line times the hole stitcher's topology merge judging the voxels a closing proposes.
"""

from __future__ import annotations

import argparse
import time

import _summary
import numpy as np

from vesuvius_lab.core import registry

STEPS = [
    ("threshold", {}),
    ("threshold", {"low": 0.3, "high": 0.8}),
    ("remove_small_components", {"min_voxels": 500, "connectivity": 26}),
    ("remove_small_components", {"min_voxels": 500, "connectivity": 6}),
    ("fill_holes", {"mode": "3d"}),
    ("fill_holes", {"mode": "3d", "max_hole_voxels": 1000}),
    ("fill_holes", {"mode": "slices", "axis": 0}),
    ("fill_holes", {"mode": "closing", "radius": 3}),
    ("fill_holes", {"mode": "closing", "radius": 3, "element": "ball"}),
    ("dilate", {"radius": 2}),
    ("erode", {"radius": 1, "iterations": 2}),
    ("median", {}),
    ("median", {"iterations": 2}),
]


def synthetic_prediction(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, _, x = np.ogrid[:size, :size, :size]
    prob = np.zeros((size, size, size), np.float32)
    for centre in np.linspace(size / 6, 5 * size / 6, 3):
        distance = np.abs(z - centre - 8 * np.sin(x / 30)).astype(np.float32)
        prob = np.maximum(prob, np.exp(-distance ** 2 / 4))
    prob += rng.random(prob.shape, dtype=np.float32) * 0.6
    return np.clip(prob, 0, 1, out=prob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=2)
    _summary.add_argument(parser)
    args = parser.parse_args()
    rows = []
    prob = synthetic_prediction(args.size)
    mask = (prob > 0.5).astype(np.uint8)
    print(f"{args.size}^3, {mask.mean():.1%} of voxels above 0.5")
    for name, params in STEPS:
        step = registry.build("postprocessors", name, params, device="cpu", runs_dir=None, threshold=0.5)
        for label, volume in (("probabilities", prob), ("mask", mask)):
            if name == "threshold" and label == "mask":
                continue
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                step(volume)
                best = min(best, time.perf_counter() - start)
            print(f"{name:24s} {str(params):50s} {label:13s} {best:6.2f} s")
            described = ", ".join(f"{key}={value}" for key, value in params.items())
            rows.append(_summary.row("postprocess", f"{name}({described}) on {label}, {args.size}^3", best, "s",
                                     target="a few s at most" if args.size >= 320 else None,
                                     note=f"best of {args.repeats}"))
    rows.append(time_topology_merge(mask, args))
    _summary.write(args.summary, rows)


def time_topology_merge(mask: np.ndarray, args) -> dict:
    """The stitcher's default merge, judging the many voxel groups a closing proposes for the noisy mask."""
    from vesuvius_lab.core.inference.stitch_merge import merge_stitched
    from vesuvius_lab.plugins.postprocess import close_mask

    proposed = close_mask(mask, 3)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        merge_stitched(mask, proposed, "topology")
        best = min(best, time.perf_counter() - start)
    added = int((proposed.astype(bool) & (mask == 0)).sum())
    print(f"{'merge_stitched topology':24s} {f'{added} proposed voxels (closing r=3)':50s} {'mask':13s} {best:6.2f} s")
    return _summary.row("postprocess", f"merge_stitched(topology) of a closing's {added} voxels, {args.size}^3",
                        best, "s", target="a few s at most" if args.size >= 320 else None,
                        note=f"best of {args.repeats}")


if __name__ == "__main__":
    main()
