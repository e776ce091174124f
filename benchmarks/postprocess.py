"""Post-processing steps on a competition-sized volume: seconds per step.

The input is a synthetic float32 prediction of the given size: three wavy sheets with noise,
so that thresholding leaves sheets, dust and holes to work on. Each step runs on the
probabilities (mask steps threshold them first at 0.5); the best time of the repeats is
printed. Target: a few seconds at most per step on 320^3.

    OMP_NUM_THREADS=1 python benchmarks/postprocess.py              # 320^3
    OMP_NUM_THREADS=1 python benchmarks/postprocess.py --size 128   # a quick run

The steps that repair sheets (close, plug_holes, patch_sheets) also run on "holed sheets": a
scroll-like mask of wavy sheets 3 voxels thick, 16 apart, with holes punched in them. Where a
library does the same work, its time is printed after ours ("peer"): scipy's binary_closing by
the same box for close, scikit-image's Hessian eigenvalues (no plate measure) for sheetness.

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
    ("close", {"radius_depth": 2, "radius_plane": 2}),
    ("close", {"radius_depth": 2, "radius_plane": 2, "per_component": True}),
    ("plug_holes", {}),
    ("patch_sheets", {}),
    ("sheetness", {"sigmas": [1.5]}),
    ("sheetness", {"sigmas": [1.0, 2.0], "mode": "replace"}),
    ("smooth", {"sigma": 1.0}),
    ("clear_border", {"width": 8}),
]

#: Steps also timed on the holed sheets (see the module's docstring).
ON_SHEETS = {"close", "plug_holes", "patch_sheets"}


def scipy_closing(volume: np.ndarray, params: dict) -> np.ndarray:
    from scipy import ndimage

    box = np.ones((2 * params["radius_depth"] + 1,) + (2 * params["radius_plane"] + 1,) * 2, bool)
    return ndimage.binary_closing(volume != 0, box)


def skimage_hessian_eigenvalues(volume: np.ndarray, params: dict) -> np.ndarray:
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals

    for sigma in params["sigmas"]:
        eigenvalues = hessian_matrix_eigvals(hessian_matrix(volume, sigma, mode="nearest",
                                                            use_gaussian_derivatives=True))
    return eigenvalues


#: name -> (peer's name, the inputs it runs on, function(volume, params)).
PEERS = {"close": ("scipy binary_closing (box)", ("mask", "holed sheets"), scipy_closing),
         "sheetness": ("skimage hessian_matrix + eigvals", ("probabilities",), skimage_hessian_eigenvalues)}


def synthetic_prediction(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, _, x = np.ogrid[:size, :size, :size]
    prob = np.zeros((size, size, size), np.float32)
    for centre in np.linspace(size / 6, 5 * size / 6, 3):
        distance = np.abs(z - centre - 8 * np.sin(x / 30)).astype(np.float32)
        prob = np.maximum(prob, np.exp(-distance ** 2 / 4))
    prob += rng.random(prob.shape, dtype=np.float32) * 0.6
    return np.clip(prob, 0, 1, out=prob)


def wavy_sheets(size: int) -> np.ndarray:
    """bool: wavy sheets 3 voxels thick every 16 voxels of depth."""
    z, y, x = np.ogrid[:size, :size, :size]
    sheets = np.zeros((size, size, size), bool)
    for centre in range(8, size - 4, 16):
        sheets |= np.abs(z - centre - 3 * np.sin(x / 25 + centre) * np.cos(y / 40)) <= 1.0
    return sheets


def holed_sheets(size: int, seed: int = 0) -> np.ndarray:
    """uint8: :func:`wavy_sheets` with holes of radius 0-4 punched through."""
    rng = np.random.default_rng(seed)
    _, y, x = np.ogrid[:size, :size, :size]
    sheets = wavy_sheets(size)
    for _ in range(size * size // 200):  # about one hole per 200 voxels^2 of a slice, spread over the sheets
        cz, cy, cx = rng.integers(0, size, 3)
        radius = rng.integers(0, 5)
        zs = slice(max(cz - 4, 0), cz + 5)
        ys, xs = slice(max(cy - radius, 0), cy + radius + 1), slice(max(cx - radius, 0), cx + radius + 1)
        sheets[zs, ys, xs] &= ((y[:, ys] - cy) ** 2 + (x[..., xs] - cx) ** 2 > radius ** 2)
    return sheets.astype(np.uint8)


def best_time(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=2)
    _summary.add_argument(parser)
    args = parser.parse_args()
    rows = []
    prob = synthetic_prediction(args.size)
    mask = (prob > 0.5).astype(np.uint8)
    sheets = holed_sheets(args.size)
    print(f"{args.size}^3, {mask.mean():.1%} of voxels above 0.5; holed sheets: {sheets.mean():.1%} of voxels")
    for name, params in STEPS:
        step = registry.build("postprocessors", name, params, device="cpu", runs_dir=None, threshold=0.5)
        inputs = [("probabilities", prob), ("mask", mask)] + ([("holed sheets", sheets)] if name in ON_SHEETS else [])
        for label, volume in inputs:
            if name == "threshold" and label == "mask":
                continue
            best = best_time(lambda: step(volume), args.repeats)
            peer_name, peer_inputs, peer_run = PEERS.get(name, (None, (), None))
            peer = best_time(lambda: peer_run(volume, params), 1) if label in peer_inputs else None
            versus = f"   peer {peer:6.2f} s ({peer_name})" if peer is not None else ""
            print(f"{name:24s} {str(params):50s} {label:13s} {best:6.2f} s{versus}")
            described = ", ".join(f"{key}={value}" for key, value in params.items())
            rows.append(_summary.row("postprocess", f"{name}({described}) on {label}, {args.size}^3", best, "s",
                                     peer=peer, peer_name=peer_name if peer is not None else None,
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
