"""An exact 3x3x3 median of a float volume, compiled with numba (about 3-4 times scipy's median_filter).

Along each row the 27-voxel window is three 3x3 columns. Each column is sorted once (it serves
three windows), and a window's median is the 14th smallest value of its three sorted columns,
found by walking the three lists as a merge does.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def _median27(padded: np.ndarray, out: np.ndarray) -> None:
    depth, height, width = out.shape
    for z in numba.prange(depth):
        columns = np.empty((width + 2, 10), np.float32)  # 9 sorted values and an infinite sentinel
        for y in range(height):
            for x in range(width + 2):
                count = 0
                for a in range(3):
                    for b in range(3):
                        value = padded[z + a, y + b, x]
                        j = count - 1
                        while j >= 0 and columns[x, j] > value:  # insertion sort of 9 values
                            columns[x, j + 1] = columns[x, j]
                            j -= 1
                        columns[x, j + 1] = value
                        count += 1
                columns[x, 9] = np.inf
            for x in range(width):
                i = j = k = 0
                for _ in range(13):  # drop the 13 smallest; the next one is the median
                    a, b, c = columns[x, i], columns[x + 1, j], columns[x + 2, k]
                    if a <= b and a <= c:
                        i += 1
                    elif b <= c:
                        j += 1
                    else:
                        k += 1
                out[z, y, x] = min(columns[x, i], columns[x + 1, j], columns[x + 2, k])


def median27(volume: np.ndarray) -> np.ndarray:
    """float32 3x3x3 median of a (D, H, W) volume, edges replicated (scipy's mode="nearest")."""
    padded = np.pad(volume.astype(np.float32, copy=False), 1, mode="edge")
    out = np.empty(volume.shape, np.float32)
    _median27(padded, out)
    return out
