"""The dimension-1 matched count m_1: two column reductions projected on each input's background.

Cells follow :mod:`vesuvius_lab.core.metric.betti_kernels`. Edge (v, t) joins v and v + u_t and has id
``3*lin(v) + t``; square (v, t) has normal axis t, spans the other two axes a < b, has corners
v, v+u_a, v+u_b, v+u_a+u_b and id ``3*lin(v) + t``; its boundary edges, in increasing id, are
(v, a), (v, b), (v+u_b, a), (v+u_a, b). A cell's value under an image is 1 when one of its
corners is background there, else 0. C is the comparison image (background where both inputs
are), so a square of C-value 1 has value 1 under both inputs.

The rule that reproduces the library: for each input X, reduce the squares that are negative in
the comparison filtration, in increasing (C-value, id), each column holding the square's
boundary edges of X-value 1 with pivot = largest edge id; Z_X = the C-value-1 squares whose
column reduces to zero; m_1 = |Z_A & Z_B|.

1. :func:`comparison_forest` adds the C-value-1 squares by decreasing id to a union-find over
   cubes plus one outside node; a square whose two cubes are already connected is negative
   (its boundary is independent of those of the squares before it), the others are cleared.
2. Whether a C-value-1 column reduces to zero depends only on the *span* of the C-value-0
   block before it, not on how that block is reduced. :func:`value0_columns` replaces the
   block by an independent set with the same span, taken from the same union-find, so that
   hardly any of its columns walks a long chain to zero (on scroll tiles this removes ~99% of
   the reduction work).
3. :func:`zero_column_squares` runs the reduction. Almost every column's pivot is free at once
   and is recorded without storing anything; the rest are reduced with a max-heap.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vesuvius_lab.core.metric.betti_kernels import find_root, index_dtype, link_roots


@njit(cache=True, inline="always")
def _square_axes(t, n1, n2):
    """(a, b, stride_a, stride_b) of the two axes a < b spanned by a square with normal t."""
    if t == 0:
        return 1, 2, n2, 1
    if t == 1:
        return 0, 2, n1 * n2, 1
    return 0, 1, n1 * n2, n2


@njit(cache=True, inline="always")
def _square_rows(bg, square, n1, n2, rows):
    """Write the square's boundary edges of value 1 under ``bg`` (flat) into rows, ascending;
    return how many."""
    lin = square // 3
    t = square - 3 * lin
    a, b, sa, sb = _square_axes(t, n1, n2)
    v0, va, vb, vab = bg[lin], bg[lin + sa], bg[lin + sb], bg[lin + sa + sb]
    count = 0
    if v0 | va:
        rows[count] = 3 * lin + a
        count += 1
    if v0 | vb:
        rows[count] = 3 * lin + b
        count += 1
    if vb | vab:
        rows[count] = 3 * (lin + sb) + a
        count += 1
    if va | vab:
        rows[count] = 3 * (lin + sa) + b
        count += 1
    return count


@njit(cache=True, inline="always")
def _square_exists(x, y, z, t, n0, n1, n2):
    if t == 0:
        return y + 1 < n1 and z + 1 < n2
    if t == 1:
        return x + 1 < n0 and z + 1 < n2
    return x + 1 < n0 and y + 1 < n1


@njit(cache=True, inline="always")
def _square_value(bg, lin, t, n1, n2):
    a, b, sa, sb = _square_axes(t, n1, n2)
    return bg[lin] | bg[lin + sa] | bg[lin + sb] | bg[lin + sa + sb]


@njit(cache=True, inline="always")
def _dual_cubes(x, y, z, t, n0, n1, n2, outside):
    """The two cubes (or the outside node) a square separates: minimum corners v - u_t and v."""
    m1, m2 = n1 - 1, n2 - 1
    base = (x * m1 + y) * m2 + z
    if t == 0:
        coord, last, cube_stride = x, n0 - 1, m1 * m2
    elif t == 1:
        coord, last, cube_stride = y, n1 - 1, m2
    else:
        coord, last, cube_stride = z, n2 - 1, 1
    below = base - cube_stride if coord > 0 else outside
    above = base if coord < last else outside
    return below, above


@njit(cache=True)
def comparison_forest(bg_c, parent, rank):
    """Step 1 over the squares of comparison value 1, by decreasing id.

    ``parent`` (identity) and ``rank`` (zeros) hold the union-find over the cubes plus the
    outside node (last); the value-0 squares continue from the state this leaves. Returns
    uint8 flags by square id, 1 = negative.
    """
    n0, n1, n2 = bg_c.shape
    flat = bg_c.ravel()
    outside = parent.size - 1
    negative = np.zeros(3 * n0 * n1 * n2, np.uint8)
    for x in range(n0 - 1, -1, -1):
        for y in range(n1 - 1, -1, -1):
            for z in range(n2 - 1, -1, -1):
                lin = (x * n1 + y) * n2 + z
                for t in range(2, -1, -1):
                    if not _square_exists(x, y, z, t, n0, n1, n2) or not _square_value(flat, lin, t, n1, n2):
                        continue
                    below, above = _dual_cubes(x, y, z, t, n0, n1, n2, outside)
                    root_below = find_root(parent, below)
                    root_above = find_root(parent, above)
                    if root_below == root_above:
                        negative[3 * lin + t] = 1
                    else:
                        link_roots(parent, rank, root_below, root_above)
    return negative


@njit(cache=True)
def value0_columns(bg_x, bg_c, parent, rank):
    """uint8 flags by square id: squares of comparison value 0 and X-value 1 whose X-projected
    boundaries span the same space as all of theirs, with hardly any dependent one left.

    Continuing the dual union-find after the value-1 squares (``parent``, ``rank``: a copy, it
    is modified), these squares are added by decreasing id. One that merges two classes is
    dropped: in the dual graph, the cut that removing it from the forest makes holds, besides
    it, only kept squares and squares of X-value 0 (whose projections are zero), so its
    projected boundary is the sum of the kept ones'. Leaving the X-value-0 squares out of the
    union-find keeps nearly all kept squares independent; the reduction handles the rest.
    """
    n0, n1, n2 = bg_x.shape
    columns = np.zeros(3 * n0 * n1 * n2, np.uint8)
    mark_value0_columns(bg_x, bg_c, parent, rank, columns, np.uint8(1))
    return columns


@njit(cache=True)
def mark_value0_columns(bg_x, bg_c, parent, rank, marks, mark):
    """Set ``marks[square id] = mark`` for the squares :func:`value0_columns` keeps."""
    n0, n1, n2 = bg_x.shape
    flat_x = bg_x.ravel()
    flat_c = bg_c.ravel()
    outside = parent.size - 1
    for x in range(n0 - 1, -1, -1):
        for y in range(n1 - 1, -1, -1):
            for z in range(n2 - 1, -1, -1):
                lin = (x * n1 + y) * n2 + z
                if flat_c[lin]:
                    continue  # a value-0 square has only foreground corners
                for t in range(2, -1, -1):
                    if not _square_exists(x, y, z, t, n0, n1, n2):
                        continue
                    if _square_value(flat_c, lin, t, n1, n2) or not _square_value(flat_x, lin, t, n1, n2):
                        continue
                    below, above = _dual_cubes(x, y, z, t, n0, n1, n2, outside)
                    root_below = find_root(parent, below)
                    root_above = find_root(parent, above)
                    if root_below != root_above:
                        link_roots(parent, rank, root_below, root_above)
                    else:
                        marks[3 * lin + t] = mark


@njit(cache=True, inline="always")
def _heap_push(heap, size, value):
    if size == heap.size:
        grown = np.empty(2 * heap.size, heap.dtype)
        grown[:size] = heap[:size]
        heap = grown
    i = size
    heap[i] = value
    while i > 0:
        up = (i - 1) >> 1
        if heap[up] >= heap[i]:
            break
        heap[up], heap[i] = heap[i], heap[up]
        i = up
    return heap, size + 1


@njit(cache=True, inline="always")
def _heap_pop(heap, size):
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and heap[left + 1] > heap[left]:
            child = left + 1
        if heap[i] >= heap[child]:
            break
        heap[i], heap[child] = heap[child], heap[i]
        i = child
    return top, size


@njit(cache=True, inline="always")
def _pop_odd(heap, size):
    """Pop the largest entry that survives Z/2 cancellation (-1 when none); returns (entry, size)."""
    while size > 0:
        top, size = _heap_pop(heap, size)
        odd = True
        while size > 0 and heap[0] == top:
            _, size = _heap_pop(heap, size)
            odd = not odd
        if odd:
            return top, size
    return -1, size


@njit(cache=True, inline="always")
def _append(array, used, value):
    """Append to a growable array; returns (array, used)."""
    if used == array.size:
        grown = np.empty(2 * array.size, array.dtype)
        grown[:used] = array[:used]
        array = grown
    array[used] = value
    return array, used + 1


@njit(cache=True)
def _store_column(heap, size, pool, pool_used, pivot):
    """Append a reduced column to ``pool`` as (length, pivot, the rest of the heap's odd entries);
    returns the pool, its used length and the heap's new size."""
    start = pool_used
    pool, pool_used = _append(pool, pool_used, 0)
    pool, pool_used = _append(pool, pool_used, pivot)
    while True:
        entry, size = _pop_odd(heap, size)
        if entry < 0:
            break
        pool, pool_used = _append(pool, pool_used, entry)
    pool[start] = pool_used - start - 1
    return pool, pool_used, size


@njit(cache=True)
def _reduce_column(rows, count, flat_x, n1, n2, pivot_owner, owner_limit, heap, owner_rows, pool, pool_used):
    """Reduce a column whose pivot is taken; returns (reduced to zero, heap, pool, pool_used).

    A column that ends with a new pivot is stored in ``pool`` at offset o as
    [length, pivot, other entries descending] and its pivot owned by 2*o + 1.
    """
    size = 0
    for i in range(count):
        heap, size = _heap_push(heap, size, rows[i])
    while True:
        pivot, size = _pop_odd(heap, size)
        if pivot < 0:
            return True, heap, pool, pool_used
        owner = pivot_owner[pivot]
        if owner < 0:
            if 2 * pool_used + 1 > owner_limit:
                raise OverflowError("Betti matching: reduced columns exceed the pivot index range")
            pivot_owner[pivot] = 2 * pool_used + 1
            pool, pool_used, size = _store_column(heap, size, pool, pool_used, pivot)
            return False, heap, pool, pool_used
        # add the owner's reduced column; its pivot cancels the one just popped
        if owner & 1 == 0:
            owner_count = _square_rows(flat_x, owner >> 1, n1, n2, owner_rows)
            for i in range(owner_count - 1):
                heap, size = _heap_push(heap, size, owner_rows[i])
        else:
            start = owner >> 1
            for i in range(start + 2, start + 1 + pool[start]):
                heap, size = _heap_push(heap, size, pool[i])


@njit(cache=True)
def zero_column_squares(bg_x, bg_c, negative, columns0, pivot_owner, owner_limit):
    """uint8 flags by square id: 1 for the comparison-value-1 negative squares whose column,
    projected on the rows of value 1 under X, reduces to zero. The value-0 block before them
    is ``columns0`` (see :func:`value0_columns`).

    ``pivot_owner`` (one entry per edge id, all -1) records who owns each pivot: ``2*square``
    for a column whose pivot was free at once (its reduced form is its boundary, not stored:
    almost every column), ``2*offset + 1`` for a column stored by :func:`_reduce_column`.
    """
    n0, n1, n2 = bg_x.shape
    flat_x = bg_x.ravel()
    flat_c = bg_c.ravel()
    zero = np.zeros(negative.size, np.uint8)
    rows = np.empty(4, np.int64)
    owner_rows = np.empty(4, np.int64)
    heap = np.empty(64, np.int64)
    pool = np.empty(1024, np.int64)
    pool_used = 0
    for value in (0, 1):
        for lin in range(flat_x.size):
            if value == 0 and flat_c[lin]:
                continue
            for t in range(3):
                square = 3 * lin + t
                if not (negative[square] if value else columns0[square]):
                    continue
                count = _square_rows(flat_x, square, n1, n2, rows)
                if count == 0:
                    continue
                pivot = rows[count - 1]
                if pivot_owner[pivot] < 0:
                    pivot_owner[pivot] = 2 * square
                    continue
                is_zero, heap, pool, pool_used = _reduce_column(rows, count, flat_x, n1, n2, pivot_owner,
                                                                owner_limit, heap, owner_rows, pool, pool_used)
                if is_zero and value == 1:
                    zero[square] = 1
    return zero


def matched_dim1(bg_a: np.ndarray, bg_b: np.ndarray, bg_c: np.ndarray) -> int:
    """m_1 of one tile, from the uint8 background masks of A, B and their intersection C."""
    n_cubes = int(np.prod([max(n - 1, 0) for n in bg_c.shape]))
    parent = np.arange(n_cubes + 1, dtype=index_dtype(n_cubes + 1))
    rank = np.zeros(n_cubes + 1, np.uint8)
    negative = comparison_forest(bg_c, parent, rank)
    pivot_owner = np.full(negative.size, -1, index_dtype(2 * negative.size + 2))
    zero = []
    for bg_x in (bg_a, bg_b):
        columns0 = value0_columns(bg_x, bg_c, parent.copy(), rank.copy())
        pivot_owner.fill(-1)
        zero.append(zero_column_squares(bg_x, bg_c, negative, columns0, pivot_owner,
                                        np.iinfo(pivot_owner.dtype).max))
    return int(np.count_nonzero(zero[0] & zero[1]))
