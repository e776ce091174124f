"""One `vlab tune` trial on a competition-sized volume: the chain and the score, against a plain score.

A trial re-applies the post-processing chain to cached probabilities and scores the mask against
a label whose label-only parts were computed once (``PreparedLabel``). The peer is what a trial
would cost without that: the same chain, then a plain ``score_volume`` call. Target: at most 2 s
of CPU per 320^3 volume per trial, chain included.

    OMP_NUM_THREADS=1 python benchmarks/tune.py              # 320^3
    OMP_NUM_THREADS=1 python benchmarks/tune.py --size 128   # a quick run

The volume: scroll-like wavy sheets 3 voxels thick every 16 voxels of depth as the label (three
unlabelled blobs and a border at each face, as in the competition's labels), and as the prediction those sheets blurred, with noise and holes, which the
chain thresholds and repairs.
"""

from __future__ import annotations

import argparse
import time

import _summary
import numpy as np
from postprocess import holed_sheets, wavy_sheets
from scipy import ndimage

from vesuvius_lab.core.inference.postprocess import build_chain
from vesuvius_lab.core.metric.prepared import PreparedLabel
from vesuvius_lab.core.metric.prepared import warm_up as warm_up_prepared
from vesuvius_lab.core.metric.score import score_volume, warm_up

#: Chains as a trial builds them: hysteresis and dust removal, and the quick ensemble's repair chain.
CHAINS = {
    "hysteresis + dust": [{"plugin": "threshold", "params": {"low": 0.3, "high": 0.6}},
                          {"plugin": "remove_small_components", "params": {"min_voxels": 200}}],
    "hysteresis + close per component + plug_holes + dust": [
        {"plugin": "threshold", "params": {"low": 0.3, "high": 0.6}},
        {"plugin": "close", "params": {"radius_depth": 1, "radius_plane": 1, "per_component": True}},
        {"plugin": "plug_holes", "params": {}},
        {"plugin": "remove_small_components", "params": {"min_voxels": 200}}],
}


def volumes(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:size, :size, :size]
    sheets = wavy_sheets(size)
    label = sheets.astype(np.uint8)
    for cz, cy, cx in rng.integers(0, size, (3, 3)):  # unlabelled blobs, and a border at every face
        label[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < (size // 6) ** 2] = 2
    for axis in range(3):
        border = [slice(None)] * 3
        for side in (slice(0, 3), slice(size - 3, size)):
            border[axis] = side
            label[tuple(border)] = 2
    holed = holed_sheets(size, seed) & sheets  # the prediction misses the holes
    probabilities = ndimage.gaussian_filter(holed.astype(np.float32), 1.0) * 2.0
    probabilities += rng.random(label.shape, dtype=np.float32) * 0.35
    return np.clip(probabilities, 0, 1).astype(np.float16), label


def cpu_seconds(run) -> tuple[float, object]:
    start = time.process_time()
    result = run()
    return time.process_time() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=2)
    _summary.add_argument(parser)
    args = parser.parse_args()
    warm_up(), warm_up_prepared()
    probabilities, label = volumes(args.size)
    prepare_s, prepared = cpu_seconds(lambda: PreparedLabel.from_label(label))
    print(f"{args.size}^3: PreparedLabel.from_label once {prepare_s:.2f} s CPU")
    target = "<= 2 s CPU per 320^3 volume" if args.size >= 320 else None
    rows = [_summary.row("tune", f"PreparedLabel.from_label once, {args.size}^3", prepare_s, "s",
                         note="once per volume")]
    for name, steps in CHAINS.items():
        chain = build_chain(steps, threshold=0.5)
        trial_s = peer_s = chain_s = float("inf")
        for _ in range(args.repeats):
            seconds, mask = cpu_seconds(lambda: chain.apply(np.asarray(probabilities, dtype=np.float32)))
            chain_s = min(chain_s, seconds)
            score_s, ours = cpu_seconds(lambda: prepared.score(mask))
            plain_s, theirs = cpu_seconds(lambda: score_volume(mask, label))
            assert ours == theirs, (ours, theirs)
            trial_s, peer_s = min(trial_s, seconds + score_s), min(peer_s, seconds + plain_s)
        print(f"{name}: one trial {trial_s:.2f} s CPU (chain {chain_s:.2f} s)   peer (chain + score_volume) "
              f"{peer_s:.2f} s   ratio {trial_s / peer_s:.2f}   (same score: {ours.score:.4f})")
        rows.append(_summary.row("tune", f"one trial, {name}, {args.size}^3", trial_s, "s", peer=peer_s,
                                 peer_name="chain + score_volume", target=target,
                                 note=f"chain {chain_s:.2f} s; best of {args.repeats}, CPU time"))
    _summary.write(args.summary, rows)

if __name__ == "__main__":
    main()
