"""Time the competition metric on 320^3 pairs and compare it with its peers.

Run: ``.venv/bin/python benchmarks/metric.py [--size 320] [--repeat 3] [--only prepared] [--summary FILE]``

Prints, for a scroll-like pair: the seconds of ``score_volume`` (CPU and wall clock) and the
CPU seconds of each part (SurfaceDice, VOI, the Betti numbers and the matched counts per
dimension of the TopoScore); the peers measured in the same run on the same arrays (DeepMind's
``surface_distance`` for SurfaceDice, scikit-image's ``variation_of_information`` for VOI) with
their values, whether they agree and the ratio of CPU times; the peak memory of a process that
scores the volume; and the numba compile time of a first call without a cache, then with it.
Then the same timings for a tunnel-heavy pair mirrored from a conformance case. Then, for both
pairs, a label prepared once for many trials (``PreparedLabel``): the one-time ``from_label``,
``score`` per trial against a plain ``score_volume`` in the same run (ratio = plain / prepared),
whether the two results are equal, and the prepared label's size. ``--only prepared`` runs that
part alone. Everything runs on one core. The machine may be shared: CPU seconds are the steadier
figure when the load average is high.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _summary
import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")




REPO = Path(__file__).resolve().parents[1]


def scroll_pair(size: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A label of wavy papyrus-like sheets (1) with holes, an unlabeled slab and face band (2),
    and a prediction made from it the way a decent model errs: sheets that wander by a voxel
    and are thinner or thicker, most of the label's holes plus holes of its own, blobs that
    bridge neighbouring sheets, and dust."""
    rng = np.random.default_rng(seed)
    n = size
    axis = np.arange(n, dtype=np.float32)
    yy, zz = np.meshgrid(axis, axis, indexing="ij")

    def wave(amplitude: float) -> np.ndarray:
        f1, f2, f3 = rng.uniform(0.01, 0.04, 3)
        p1, p2, p3 = rng.uniform(0, 2 * np.pi, 3)
        return amplitude * (np.sin(f1 * yy + p1) + np.cos(f2 * zz + p2) + 0.5 * np.sin(f3 * (yy + zz) + p3))

    label = np.zeros((n, n, n), np.uint8)
    pred = np.zeros((n, n, n), np.uint8)
    x = axis[:, None, None]
    spacing = 22.0
    for centre in np.arange(spacing / 2, n, spacing):
        surface = centre + wave(4.0)
        label[np.abs(x - surface[None]) < 2.0] = 1
        drift = np.round(wave(0.8))
        half = 2.0 + 0.6 * np.sin(yy / 17.0 + centre)
        pred[np.abs(x - (surface + drift)[None]) < half[None]] = 1

    def balls(count: int, radius: tuple[float, float]):
        for _ in range(count):
            r = rng.uniform(*radius)
            c = rng.integers(0, n, 3)
            box = tuple(slice(max(int(ci - r), 0), min(int(ci + r) + 1, n)) for ci in c)
            grid = np.ogrid[box]
            yield sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r * r, box

    for inside, box in balls(300, (1.5, 3.5)):  # holes in the papyrus, mostly found by the model
        label[box][inside] = 0
        if rng.random() < 0.8:
            pred[box][inside] = 0
    for inside, box in balls(400, (1.5, 4.0)):  # holes the model makes
        pred[box][inside] = 0
    for inside, box in balls(1500, (0.5, 1.8)):  # dust
        pred[box][inside] = 1
    for inside, box in balls(120, (3.0, 7.0)):  # blobs that bridge neighbouring sheets
        pred[box][inside] = 1
    slab = label[:, :, : n // 3]
    slab[slab == 0] = 2  # an unlabeled slab
    band = 3
    face = np.ones((n, n, n), bool)
    face[band:-band, band:-band, band:-band] = False
    label[face] = 2
    return pred, label


def mirrored_conformance_pair(name: str = "case101_02_dust", size: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """A conformance case tiled by mirroring up to size^3: its label has ~800 tunnels per 10^6
    voxels (~30,000 in all) and the prediction matches nearly all, the heavy case for m_1."""
    with np.load(REPO / "tests" / "data" / "conformance" / "metric_cases.npz") as data:
        arrays = [data[f"{name}__pred"], data[f"{name}__label"]]
    for i, array in enumerate(arrays):
        for axis, n in enumerate(array.shape):
            copies = -(-size // n)
            array = np.concatenate([array if c % 2 == 0 else np.flip(array, axis) for c in range(copies)], axis=axis)
        arrays[i] = np.ascontiguousarray(array[:size, :size, :size])
    return arrays[0], arrays[1]


class Clock:
    """Wall-clock and CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_ours(pred, label, repeat: int):
    from vesuvius_lab.core.metric.score import score_volume

    best = None
    for _ in range(repeat):
        timings: dict[str, float] = {}
        with Clock() as clock:
            score = score_volume(pred, label, timings=timings)
        if best is None or clock.cpu < best[0].cpu:
            best = (clock, timings, score)
    return best


def time_surface_distance_peer(pred_fg, label_fg):
    import warnings

    import surface_distance

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the package's own scipy imports
    with Clock() as clock:
        distances = surface_distance.compute_surface_distances(label_fg, pred_fg, (1.0, 1.0, 1.0))
        value = surface_distance.compute_surface_dice_at_tolerance(distances, 2.0)
    return clock, float(value)


def time_voi_peer(pred_fg, label_fg):
    import cc3d
    from skimage.metrics import variation_of_information

    with Clock() as clock:
        label_ids = cc3d.connected_components(label_fg, connectivity=26)
        pred_ids = cc3d.connected_components(pred_fg, connectivity=26)
        covered = (label_ids > 0) | (pred_ids > 0)
        split, merge = variation_of_information(label_ids[covered], pred_ids[covered])
    return clock, float(split), float(merge)


def betti_matching_peer() -> str:
    import importlib.util

    if importlib.util.find_spec("betti_matching") is None:  # the Betti-Matching-3D Python binding
        return ("Betti-Matching-3D (C++ library with Python binding): not installable on this machine, "
                "so no TopoScore peer was timed in this run")
    return "Betti-Matching-3D is importable, but this script does not time it yet"


CHILD_FIRST_CALL = """
import time
start = time.perf_counter()
from vesuvius_lab.core.metric.score import warm_up
warm_up()  # every kernel of the score, on tiny volumes
print(time.perf_counter() - start)
"""

CHILD_MEMORY = """
import sys, numpy as np
from vesuvius_lab.core.metric.score import score_volume

def peak_mib():  # high-water mark of this process's resident memory (Linux)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

data = np.load(sys.argv[1])
pred, label = data["pred"], data["label"]
before = peak_mib()
score_volume(pred, label)
print(before, peak_mib())
"""


def time_prepared(pred, label, repeat: int, pair: str) -> tuple[list[dict], dict]:
    """A label prepared once, then scored per trial, against ``score_volume`` in the same run."""
    import pickle

    from vesuvius_lab.core.metric.prepared import PreparedLabel
    from vesuvius_lab.core.metric.score import score_volume

    crop = tuple(slice(0, min(n, 32)) for n in label.shape)
    PreparedLabel.from_label(label[crop]).score(pred[crop])  # load the compiled kernels first
    with Clock() as once:
        prepared = PreparedLabel.from_label(label)
    prepared.score(pred)  # the first trial allocates the work arrays it keeps
    trial, plain = None, None
    parts: dict[str, float] = {}
    for _ in range(repeat):  # interleaved, so that both see the same load
        timings: dict[str, float] = {}
        with Clock() as clock:
            got = prepared.score(pred, timings=timings)
        if trial is None or clock.cpu < trial.cpu:
            trial, parts = clock, timings
        with Clock() as clock:
            want = score_volume(pred, label)
        if plain is None or clock.cpu < plain.cpu:
            plain = clock
    equal = got == want
    verdict = "equal" if equal else "DIFFER"
    mib, pickled = prepared.nbytes / 2**20, len(pickle.dumps(prepared)) / 2**20
    chains = sum(tile.chains is not None for tile in prepared.tiles)
    print(f"\nprepared label, {pair} (best of {repeat} by CPU; ratio = score_volume / prepared score):")
    print(f"  from_label (once)        {once.cpu:6.2f} s CPU  {once.wall:6.2f} s wall")
    print(f"  score per trial          {trial.cpu:6.2f} s CPU  {trial.wall:6.2f} s wall   "
          f"score_volume {plain.cpu:5.2f} s CPU   x{plain.cpu / trial.cpu:.1f}   results {verdict}")
    print("  per trial, CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    print(f"  prepared label: {mib:.0f} MiB in memory, {pickled:.0f} MiB pickled; "
          f"label tunnel chains on {chains} of {len(prepared.tiles)} tiles; "
          f"break-even after {once.cpu / max(plain.cpu - trial.cpu, 1e-9):.1f} trials")
    rows = [
        _summary.row("metric", f"PreparedLabel.score per trial, {pair}", trial.cpu, "s CPU", peer=plain.cpu,
                     peer_name="score_volume (same run)",
                     note=f"results {verdict}; from_label {once.cpu:.2f} s CPU once; best of {repeat}"),
        _summary.row("metric", f"PreparedLabel memory, {pair}", mib, "MiB", note=f"{pickled:.0f} MiB pickled"),
    ]
    summary = {"from_label_cpu_s": round(once.cpu, 3), "score_cpu_s": round(trial.cpu, 3),
               "score_volume_cpu_s": round(plain.cpu, 3), "equal": bool(equal), "mib": round(mib, 1),
               "parts_cpu_s": {k: round(v, 3) for k, v in parts.items()}}
    return rows, summary


def run_child(code: str, *args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env={**os.environ, **(env or {})},
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


def peer_row(part: str, peer_name: str, peer_clock, ours: float, diff: float, values: str) -> dict:
    """Print one part's time and values against its peer's; the summary row for it."""
    verdict = "agree" if diff < 1e-9 else "DIFFER"
    print(f"  {part:12s} {peer_name:16s} {peer_clock.cpu:6.2f} s   ours {ours:5.2f} s   "
          f"x{peer_clock.cpu / ours:.1f}   {values} (values {verdict}, |diff| {diff:.1e})")
    return _summary.row("metric", f"{part} part", ours, "s CPU", peer=peer_clock.cpu, peer_name=peer_name,
                        note=f"values {verdict} (|diff| {diff:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="side of the cubic test volume")
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours; the fastest (CPU) is shown")
    parser.add_argument("--only", choices=["prepared"], help="run only this part: the prepared label")
    _summary.add_argument(parser)
    args = parser.parse_args()
    rows = []
    if args.only == "prepared":
        from vesuvius_lab.core.metric.score import score_volume

        print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
        pred, label = scroll_pair(args.size)
        score_volume(pred[:32, :32, :32], label[:32, :32, :32])  # load the compiled kernels
        summary = {}
        for key, pair, arrays in (("scroll_like", f"scroll-like {args.size}^3 pair", (pred, label)),
                                  ("tunnel_heavy", f"tunnel-heavy {args.size}^3 pair",
                                   mirrored_conformance_pair(size=args.size))):
            part_rows, summary[key] = time_prepared(*arrays, args.repeat, pair)
            rows += part_rows
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(json.dumps({"prepared": summary}))
        _summary.write(args.summary, rows)
        return

    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as cache:
        cold = float(run_child(CHILD_FIRST_CALL, env={"NUMBA_CACHE_DIR": cache}))
        warm = float(run_child(CHILD_FIRST_CALL, env={"NUMBA_CACHE_DIR": cache}))
    print(f"first call in a fresh process (import, then every kernel once on tiny volumes): {cold:.1f} s "
          f"without the numba cache (compiling), {warm:.1f} s with it")

    pred, label = scroll_pair(args.size)
    from vesuvius_lab.core.metric.score import foreground_masks, score_volume

    score_volume(pred[:32, :32, :32], label[:32, :32, :32])  # load the compiled kernels
    pred_fg, label_fg = foreground_masks(pred, label)
    print(f"volume {pred.shape}: {label_fg.mean():.1%} label surface, {pred_fg.mean():.1%} predicted, "
          f"{(label == 2).mean():.1%} unlabeled")

    clock, timings, score = time_ours(pred, label, args.repeat)
    print(f"\nscore_volume: {clock.cpu:.2f} s CPU, {clock.wall:.2f} s wall per volume (best of {args.repeat} by CPU)")
    print(f"  score {score.score:.6f}  topo {score.topo_score:.6f}  surface_dice {score.surface_dice:.6f}  "
          f"voi {score.voi_score:.6f}  betti (m, p, g) {score.betti}")
    parts = [("SurfaceDice", "surface_dice"), ("VOI", "voi"), ("Betti numbers (p_k, g_k)", "betti_numbers"),
             ("TopoScore dim 0 (m_0)", "dim0"), ("TopoScore dim 1 (m_1)", "dim1"), ("TopoScore dim 2 (m_2)", "dim2")]
    for name, key in parts:
        print(f"  {name:28s} {timings.get(key, 0.0):6.2f} s CPU")
    rows.append(_summary.row("metric", f"score_volume, scroll-like {args.size}^3 pair", clock.cpu, "s CPU",
                             peer_name="official Betti-Matching-3D",
                             note=f"wall {clock.wall:.2f} s, best of {args.repeat}; {betti_matching_peer()}"))

    print("\npeers on the same arrays (ratio = peer CPU time / ours):")
    peer_clock, peer_dice = time_surface_distance_peer(pred_fg, label_fg)
    rows.append(peer_row("SurfaceDice", "surface-distance", peer_clock, timings["surface_dice"],
                         abs(peer_dice - score.surface_dice), f"value {peer_dice:.12f}"))
    peer_clock, split, merge = time_voi_peer(pred_fg, label_fg)
    rows.append(peer_row("VOI", "scikit-image", peer_clock, timings["voi"],
                         max(abs(split - score.voi_split), abs(merge - score.voi_merge)),
                         f"split {split:.12f} merge {merge:.12f}"))
    print(f"  TopoScore    {betti_matching_peer()}")

    pred_t, label_t = mirrored_conformance_pair(size=args.size)
    t_clock, t_timings, t_score = time_ours(pred_t, label_t, args.repeat)
    print(f"\ntunnel-heavy pair (conformance case101_02_dust mirrored to {args.size}^3): {t_clock.cpu:.2f} s CPU, "
          f"{t_clock.wall:.2f} s wall per volume\n  betti (m, p, g) {t_score.betti}")
    print("  CPU s: " + ", ".join(f"{name.split(' (')[0]} {t_timings.get(key, 0.0):.2f}" for name, key in parts))
    rows.append(_summary.row("metric", f"score_volume, tunnel-heavy {args.size}^3 pair", t_clock.cpu, "s CPU",
                             note=f"wall {t_clock.wall:.2f} s; conformance case101_02_dust mirrored"))

    prepared = {}
    for key, pair, arrays in (("scroll_like", f"scroll-like {args.size}^3 pair", (pred, label)),
                              ("tunnel_heavy", f"tunnel-heavy {args.size}^3 pair", (pred_t, label_t))):
        part_rows, prepared[key] = time_prepared(*arrays, args.repeat, pair)
        rows += part_rows

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pair.npz"
        np.savez(path, pred=pred, label=label)
        before, after = (float(x) for x in run_child(CHILD_MEMORY, str(path)).split())
    print(f"\npeak memory of a process scoring the volume: {after:.0f} MiB "
          f"({before:.0f} MiB after loading the pair, before scoring)")
    rows.append(_summary.row("metric", "peak memory of a process scoring the volume", after, "MiB",
                             note=f"{before:.0f} MiB after loading the pair"))
    rows.append(_summary.row("metric", "first call in a fresh process", cold, "s",
                             note=f"numba compile without cache; {warm:.1f} s with the cache"))
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    summary = {}
    for key, (c, t) in {"scroll_like": (clock, timings), "tunnel_heavy": (t_clock, t_timings)}.items():
        summary[key] = {"cpu_s": round(c.cpu, 3), "wall_s": round(c.wall, 3),
                        "parts_cpu_s": {k: round(v, 3) for k, v in t.items()}}
    print(json.dumps({**summary, "peak_mib": round(after), "compile_s": round(cold, 1), "prepared": prepared}))
    _summary.write(args.summary, rows)


if __name__ == "__main__":
    main()
