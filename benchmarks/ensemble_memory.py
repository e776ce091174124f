"""Memory of combining ensemble members: five cached members of a 320^3 volume into one.

Each member's float16 probabilities are saved as ``.npy`` (as the probability cache stores them)
and combined from memory maps with :func:`vesuvius_lab.core.inference.ensemble.combine`, once per mode.
Printed: the peak of numpy's traced allocations (tracemalloc) during the combination, in MiB and
as a multiple of one float32 volume. Memory-mapped pages are file cache, not allocations, so the
peak is the float32 running sum plus the slab being added.

Target: at most 2.0 x one float32 volume (the running sum plus one member), whatever the number
of members.

    OMP_NUM_THREADS=1 python benchmarks/ensemble_memory.py               # 320^3, five members
    OMP_NUM_THREADS=1 python benchmarks/ensemble_memory.py --size 96 --members 3
"""

from __future__ import annotations

import argparse
import tempfile
import tracemalloc
from pathlib import Path

import _summary
import numpy as np

from vesuvius_lab.core.inference.ensemble import combine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="Side of the cubic volume.")
    parser.add_argument("--members", type=int, default=5, help="Cached members to combine.")
    _summary.add_argument(parser)
    args = parser.parse_args()
    rows = []
    shape = (args.size,) * 3
    volume_bytes = int(np.prod(shape)) * 4
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for member in range(args.members):
            path = Path(folder) / f"member{member}.npy"
            np.save(path, rng.random(shape, dtype=np.float32).astype(np.float16))
            paths.append(path)
        for mode in ("mean", "weighted", "logit_mean"):
            tracemalloc.start()
            combined = combine(((1.0 + n, np.load(p, mmap_mode="r")) for n, p in enumerate(paths)), mode)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"{mode:>10}: {args.members} members of {args.size}^3, peak {peak / 2**20:.1f} MiB = "
                  f"{peak / volume_bytes:.2f} x one float32 volume ({volume_bytes / 2**20:.0f} MiB)")
            rows.append(_summary.row("ensemble_memory", f"peak memory combining {args.members} cached members of "
                                     f"{args.size}^3, mode {mode}", peak / volume_bytes, "x one volume",
                                     target="<= 2.0", note=f"{peak / 2**20:.0f} MiB; one float32 volume "
                                                           f"{volume_bytes / 2**20:.0f} MiB"))
            del combined
    _summary.write(args.summary, rows)


if __name__ == "__main__":
    main()
