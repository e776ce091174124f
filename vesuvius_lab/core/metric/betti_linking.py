"""m_1 with the label's half done once (linking numbers), and the per-trial reductions cut short.

:mod:`vesuvius_lab.core.metric.betti_dim1` finds, for each input X, the set Z_X of comparison-negative
squares of C-value 1 whose boundary projected on X's background rows reduces to zero, by a column
reduction that depends on the comparison image (so on the prediction); m_1 = |Z_A & Z_B|. This
module computes the same sets (the tests compare the counts with ``matched_dim1`` on thousands of
random tiles and on the library's tile cases) in three ways that do less work.

1. Z_label from the comparison forest, with label-only chains. Let ``d`` be the square-to-edge
   boundary of the whole tile and K_X the foreground complex of X. s is in Z_X iff s is negative
   and ``d s`` lies in d(squares before s) + C_1(K_X). Over Z/2, look at the annihilator: the
   1-cochains f vanishing on C_1(K_X) whose coboundary vanishes before s. Every 2-cocycle of the
   tile is a coboundary (a box has no H^1, H^2), and the 2-cocycles supported on the squares not yet
   added (comparison value 1, id >= s) are the cycles of the dual graph (cubes and the outside
   node) over them. Send a dual cycle g = df to the class of f restricted to K_X in H^1(K_X):
   a well-defined linear map L. Counting dimensions, s is in Z_X iff s closes a dual cycle
   gamma_s over the squares of larger id (s is negative) and L(gamma_s) is not in the span of
   L(the dual cycles over the squares of larger id). Pairing with H_1(K_X) reads L off: for a cycle
   z = dS of K_X, <L(g), z> = f(dS) = g(S), the parity of the squares of S that the dual cycle
   crosses. So with 2-chains S_1..S_r (r = beta_1(K_X)) of the tile whose boundaries are a basis of
   H_1(K_X), the bits w(s) = (s in S_i)_i and an xor-potential union-find over the dual forest give
   L(gamma_s) for every negative square as :func:`forest_with_linking` meets it (decreasing id, as
   ``comparison_forest``); an xor basis of the vectors met so far tells whether it is new.

   The chains depend on the label alone: :func:`killing_chains` runs the label's own reduction
   (C = X) and records which columns were added to which; the beta_1 columns that reduce to zero,
   with everything added to them, are chains whose boundaries lie in K_X, and they are independent
   (the last square of a dependent sum would not be negative), so they are a basis. One machine
   word of bits: a label tile with more than :data:`MAX_LINK_BITS` tunnels uses (3) for both inputs.

2. The forest skips most squares (the shortcuts are proved in :func:`forest_with_linking`), and the
   prediction's reduction skips the columns that are certainly emergent and runs only up to the
   last square of Z_label (:func:`zero_squares`).

3. :func:`matched_dim1_fast`: both inputs reduced, with the shortcuts of (2).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from vesuvius_lab.core.metric.betti_dim1 import (_append, _dual_cubes, _heap_push, _pop_odd, _square_axes,
                                                 _square_exists, _square_rows, _square_value, comparison_forest,
                                                 _store_column, mark_value0_columns)
from vesuvius_lab.core.metric.betti_kernels import index_dtype, link_roots

#: The widest label tile handled by the linking test (one machine word of bits per square);
#: a label tile with more tunnels has both inputs reduced (:func:`matched_dim1_fast`).
MAX_LINK_BITS = 64


@njit(cache=True)
def _self_reduction(bg_x, negative, pivot_owner, max_zero):
    """The reduction of X against itself, recording every non-emergent column.

    Returns (record squares, record add offsets (n_rec + 1), added owners, zero records, n_zero);
    n_zero = -1 when more than ``max_zero`` columns reduce to zero. An owner is ``2*square`` for a
    column whose pivot was free at once (its chain is the square alone) and ``2*record + 1`` for a
    recorded one.
    """
    n0, n1, n2 = bg_x.shape
    flat = bg_x.ravel()
    rows = np.empty(4, np.int64)
    owner_rows = np.empty(4, np.int64)
    heap = np.empty(64, np.int64)
    pool = np.empty(1024, np.int64)
    pool_used = 0
    rec_square = np.empty(256, np.int64)
    rec_pool = np.empty(256, np.int64)
    rec_adds = np.empty(256, np.int64)
    n_rec = 0
    adds = np.empty(1024, np.int64)
    n_adds = 0
    zero_recs = np.empty(max(max_zero, 1), np.int64)
    n_zero = 0
    for lin in range(flat.size):
        for t in range(3):
            square = 3 * lin + t
            if not negative[square]:
                continue
            count = _square_rows(flat, square, n1, n2, rows)
            if count == 0:
                continue
            pivot = rows[count - 1]
            if pivot_owner[pivot] < 0:
                pivot_owner[pivot] = 2 * square
                continue
            rec = n_rec
            rec_square, _ = _append(rec_square, n_rec, square)
            rec_adds, _ = _append(rec_adds, n_rec, n_adds)
            rec_pool, n_rec = _append(rec_pool, n_rec, -1)
            size = 0
            for i in range(count):
                heap, size = _heap_push(heap, size, rows[i])
            while True:
                pivot, size = _pop_odd(heap, size)
                if pivot < 0:
                    if n_zero == max_zero:
                        return rec_square[:n_rec], rec_adds[:n_rec], adds[:n_adds], zero_recs[:0], -1
                    zero_recs[n_zero] = rec
                    n_zero += 1
                    break
                owner = pivot_owner[pivot]
                if owner < 0:
                    pivot_owner[pivot] = 2 * rec + 1
                    rec_pool[rec] = pool_used
                    pool, pool_used, size = _store_column(heap, size, pool, pool_used, pivot)
                    break
                adds, n_adds = _append(adds, n_adds, owner)
                if owner & 1 == 0:
                    owner_count = _square_rows(flat, owner >> 1, n1, n2, owner_rows)
                    for i in range(owner_count - 1):
                        heap, size = _heap_push(heap, size, owner_rows[i])
                else:
                    start = rec_pool[owner >> 1]
                    for i in range(start + 2, start + 1 + pool[start]):
                        heap, size = _heap_push(heap, size, pool[i])
    rec_adds, _ = _append(rec_adds, n_rec, n_adds)
    return rec_square[:n_rec], rec_adds[:n_rec + 1], adds[:n_adds], zero_recs[:n_zero], n_zero


@njit(cache=True)
def _chain_bits(rec_square, rec_adds, adds, zero_recs):
    """(square, bits) pairs, squares repeated: bit i marks the chain of zero column i (xor them)."""
    n_rec = rec_square.size
    parity = np.zeros(n_rec, np.uint64)
    for i in range(zero_recs.size):
        parity[zero_recs[i]] ^= np.uint64(1) << np.uint64(i)
    out_square = np.empty(1024, np.int64)
    out_bits = np.empty(1024, np.uint64)
    n_out = 0
    for rec in range(n_rec - 1, -1, -1):  # owners are earlier records: their parity is final when reached
        bits = parity[rec]
        if bits == 0:
            continue
        out_bits, _ = _append(out_bits, n_out, bits)
        out_square, n_out = _append(out_square, n_out, rec_square[rec])
        for j in range(rec_adds[rec], rec_adds[rec + 1]):
            owner = adds[j]
            if owner & 1:
                parity[owner >> 1] ^= bits
            else:
                out_bits, _ = _append(out_bits, n_out, bits)
                out_square, n_out = _append(out_square, n_out, owner >> 1)
    return out_square[:n_out], out_bits[:n_out]


def killing_chains(bg_x: np.ndarray, expected: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The label's linking bits of one tile: (square ids, decreasing; uint64 bits), bit i set on the
    squares of the chain S_i. ``expected`` is beta_1 of the foreground; None when it is over
    :data:`MAX_LINK_BITS` (or, as a safeguard, when the reduction finds another count)."""
    if expected > MAX_LINK_BITS:
        return None
    n_cubes = int(np.prod([max(n - 1, 0) for n in bg_x.shape]))
    parent = np.arange(n_cubes + 1, dtype=index_dtype(n_cubes + 1))
    rank = np.zeros(n_cubes + 1, np.uint8)
    negative = comparison_forest(bg_x, parent, rank)
    del parent, rank
    pivot_owner = np.full(negative.size, -1, index_dtype(2 * negative.size + 2))
    rec_square, rec_adds, adds, zero_recs, n_zero = _self_reduction(bg_x, negative, pivot_owner, MAX_LINK_BITS)
    if n_zero != expected:
        return None
    squares, bits = _chain_bits(rec_square, rec_adds, adds, zero_recs)
    order = np.argsort(squares, kind="stable")
    squares, bits = squares[order], bits[order]
    if squares.size:
        starts = np.flatnonzero(np.r_[True, squares[1:] != squares[:-1]])
        squares, bits = squares[starts], np.bitwise_xor.reduceat(bits, starts)
        keep = bits != 0
        squares, bits = squares[keep], bits[keep]
    return np.ascontiguousarray(squares[::-1]), np.ascontiguousarray(bits[::-1])


# --------------------------------------------------------------------------- per trial


class Scratch:
    """Work arrays of the per-trial kernels, kept between tiles and trials (a 160^3 tile needs
    ~110 MB); not part of any pickled state."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None or array.size < size or array.dtype != np.dtype(dtype):
            array = np.empty(size, dtype)
            self._arrays[name] = array
        return array[:size]


#: square kinds in the per-trial array (one byte per square id)
NOT_A_COLUMN, NEGATIVE_CLOSED, NEGATIVE_VISIT, VALUE0_COLUMN = 0, 1, 2, 3


@njit(cache=True, inline="always")
def _find_with_parity(parent, parity, node):
    """Union-find root with path halving, and the xor of ``parity`` along the path to it.
    parity[v] is the xor from v to parent[v], set when v stops being a root; a root's entry is
    never read (the arrays are reused without clearing)."""
    acc = np.uint64(0)
    while True:
        up = parent[node]
        if up == node:
            return node, acc
        grand = parent[up]
        if grand == up:
            return up, acc ^ parity[node]
        parity[node] ^= parity[up]
        parent[node] = grand
        acc ^= parity[node]
        node = grand


@njit(cache=True)
def forest_with_linking(bg_c, parent, rank, parity, kinds, link_squares, link_bits):
    """:func:`comparison_forest` and the squares of Z_label (returned, in decreasing id).

    Writes every entry of ``kinds`` (3 per voxel): NEGATIVE_CLOSED or NEGATIVE_VISIT for the negative
    squares (decided by the shortcut below, or by the union-find), NOT_A_COLUMN for the others.
    ``parent``, ``rank`` (one per cube, plus the outside node last) are initialised here and left
    holding the forest; ``parity`` is scratch. ``link_squares`` (decreasing) and ``link_bits`` are
    the label's chains from :func:`killing_chains`.

    A shortcut skips the union-find for most squares. Square (v, 2) and the squares (v+u0, 2),
    (v+u0, 0), (v+u0-u2, 0) are the four around the edge (v+u0, 1), and the other three have larger
    ids; likewise (v, 1) with (v+u0, 1), (v+u0, 0), (v+u0-u1, 0) around the edge (v+u0, 2). When
    that edge is inside the tile and has comparison value 1, the three are already in the dual
    graph and close a cycle with the square: it is negative. Its dual cycle differs from that
    4-cycle by earlier dual cycles, and the 4-cycle is the coboundary of an edge outside K_X for
    both inputs, so L_X of it is 0: the square is in neither Z_X. The union-find only changes at
    positive squares, so skipping these leaves the forest as it was. And square (v, 0) with x > 0 is
    the face of largest id of the cube below it, whose other faces come later: that cube is still
    alone, the square is positive, and the cube can hang under the parent of the cube above without
    a find (any tree that spans the classes will do; the parity to it is that of the cube above, xor
    w of the square).
    """
    n0, n1, n2 = bg_c.shape
    flat = bg_c.ravel()
    outside = parent.size - 1
    plane = n1 * n2
    for i in range(parent.size):
        parent[i] = i
        rank[i] = 0
    basis = np.zeros(64, np.uint64)  # xor basis, indexed by leading bit
    killed = np.empty(64, np.int64)
    n_killed = 0
    k = 0
    n_link = link_squares.size
    for x in range(n0 - 1, -1, -1):
        for y in range(n1 - 1, -1, -1):
            for z in range(n2 - 1, -1, -1):
                lin = (x * n1 + y) * n2 + z
                for t in range(2, -1, -1):
                    square = 3 * lin + t
                    kinds[square] = NOT_A_COLUMN
                    if not _square_exists(x, y, z, t, n0, n1, n2) or not _square_value(flat, lin, t, n1, n2):
                        continue
                    # closed around an edge of comparison value 1 by three larger squares: negative,
                    # and its dual cycle adds nothing; no union-find work
                    if t == 2 and x + 2 < n0 and 0 < z < n2 - 1 and (flat[lin + plane] | flat[lin + plane + n2]):
                        kinds[square] = NEGATIVE_CLOSED
                        continue
                    if t == 1 and x + 2 < n0 and 0 < y < n1 - 1 and (flat[lin + plane] | flat[lin + plane + 1]):
                        kinds[square] = NEGATIVE_CLOSED
                        continue
                    while k < n_link and link_squares[k] > square:
                        k += 1
                    w = link_bits[k] if k < n_link and link_squares[k] == square else np.uint64(0)
                    below, above = _dual_cubes(x, y, z, t, n0, n1, n2, outside)
                    if t == 0 and x > 0:
                        # the cube below is still alone: a positive square, no find needed
                        up = parent[above]
                        parent[below] = up
                        parity[below] = w if up == above else parity[above] ^ w
                        continue
                    root_below, parity_below = _find_with_parity(parent, parity, below)
                    root_above, parity_above = _find_with_parity(parent, parity, above)
                    if root_below == root_above:
                        kinds[square] = NEGATIVE_VISIT
                        vector = parity_below ^ parity_above ^ w
                        while vector != 0:
                            lead = 63
                            while ((vector >> np.uint64(lead)) & np.uint64(1)) == 0:
                                lead -= 1
                            if basis[lead] == 0:
                                basis[lead] = vector
                                killed[n_killed] = square
                                n_killed += 1
                                break
                            vector ^= basis[lead]
                    else:
                        root = link_roots(parent, rank, root_below, root_above)
                        child = root_above if root == root_below else root_below
                        parity[child] = parity_below ^ parity_above ^ w
    return killed[:n_killed]


@njit(cache=True)
def value0_column_marks(bg_x, bg_c, parent, rank, kinds):
    """:func:`vesuvius_lab.core.metric.betti_dim1.value0_columns` on the forest left by
    :func:`forest_with_linking`: marks its squares VALUE0_COLUMN in ``kinds`` (they have comparison
    value 0, so no other mark is lost)."""
    mark_value0_columns(bg_x, bg_c, parent, rank, kinds, VALUE0_COLUMN)


@njit(cache=True)
def _squares_of_kind(kinds, kind, stop):
    """The square ids below ``stop`` with this kind, increasing (two passes: no growing array)."""
    count = 0
    for square in range(stop):
        count += kinds[square] == kind
    out = np.empty(count, np.int64)
    count = 0
    for square in range(stop):
        if kinds[square] == kind:
            out[count] = square
            count += 1
    return out


@njit(cache=True)
def _mark_near_value0(kinds, columns0_list, n1, n2):
    """Turn NEGATIVE_CLOSED into NEGATIVE_VISIT for the squares whose top edge is an edge of a
    value-0 column: only those closed squares can find their top edge taken."""
    plane = n1 * n2
    for i in range(columns0_list.size):
        square = columns0_list[i]
        lin = square // 3
        t = square - 3 * lin
        a, b, sa, sb = _square_axes(t, n1, n2)
        for e in range(4):
            if e == 0:
                edge = 3 * lin + a
            elif e == 1:
                edge = 3 * lin + b
            elif e == 2:
                edge = 3 * (lin + sb) + a
            else:
                edge = 3 * (lin + sa) + b
            w = edge // 3
            axis = edge - 3 * w
            if axis == 0 or w < plane:
                continue
            top_of = 3 * (w - plane) + (2 if axis == 1 else 1)
            if kinds[top_of] == NEGATIVE_CLOSED:
                kinds[top_of] = NEGATIVE_VISIT


@njit(cache=True, inline="always")
def _implicit(square, flat_x, kinds, plane, n2):
    """Whether a negative value-1 square (v, t), t = 1 or 2, is a column whose pivot is its top edge
    and is free when it is reached: see :func:`zero_squares`."""
    lin = square // 3
    t = square - 3 * lin
    if t == 0:
        return False
    step = n2 if t == 2 else 1  # the top edge (v+u0, b): b = 1 for t = 2, b = 2 for t = 1
    top = lin + plane  # inside: a square with t > 0 has x + 1 < n0
    if not (flat_x[top] | flat_x[top + step]):
        return False  # the top edge has X-value 0: not a row
    # the other squares around the top edge: (w, t), (w, 0), (w - u_t, 0) with w = v + u0. When w
    # is on the face where w - u_t leaves the tile the last index is another square's: the test
    # is then only stricter (a column kept explicit is reduced exactly as the original does), and
    # every use applies the same test.
    return not (kinds[3 * top + t] == VALUE0_COLUMN or kinds[3 * top] == VALUE0_COLUMN
                or kinds[3 * (top - (1 if t == 2 else n2))] == VALUE0_COLUMN)


@njit(cache=True, inline="always")
def _owner(edge, current, pivot_owner, flat_x, kinds, plane, n2):
    """The owner of a pivot, the implicit columns included (``current``: the value-1 square being
    reduced; -1 in the value-0 block, where no implicit column has been reached)."""
    owner = pivot_owner[edge]
    if owner >= 0 or current < 0:
        return owner
    lin = edge // 3
    b = edge - 3 * lin
    if b == 0 or lin < plane:
        return -1
    square = 3 * (lin - plane) + (2 if b == 1 else 1)  # the square whose top edge this is
    kind = kinds[square]
    if square < current and (kind == NEGATIVE_CLOSED or kind == NEGATIVE_VISIT) and _implicit(
            square, flat_x, kinds, plane, n2):
        return 2 * square
    return -1


@njit(cache=True)
def zero_squares(bg_x, kinds, columns0_list, visit, pivot_owner, owner_limit):
    """The value-1 squares (increasing) whose column reduces to zero in X's reduction of
    :func:`vesuvius_lab.core.metric.betti_dim1.zero_column_squares` (Z_X), visiting only the value-0
    columns (``columns0_list``) and the value-1 columns in ``visit`` (increasing; it may stop at
    any square: later columns cannot change whether earlier ones reduce to zero).

    A value-1 column (v, t) with t = 1 or 2 spans axes 0 < b; its edge of largest id is the top edge
    (v+u0, b), and the other squares around that edge have larger ids. So when the top edge has
    X-value 1 and none of those squares is a column of the value-0 block, no column reduced before
    (v, t) holds the edge: the column is emergent, with the top edge as pivot. Such "implicit"
    columns are skipped (they are not in Z_X); a column that later meets their pivot finds the owner
    by :func:`_owner`, which applies the same test to the one square whose top edge it is. Every
    negative square left out of ``visit`` must be implicit (:func:`_mark_near_value0`).

    The reduction itself is ``betti_dim1._reduce_column``'s (same pivots, same stored columns), with
    the working column kept as a descending array instead of a heap.
    """
    n0, n1, n2 = bg_x.shape
    plane = n1 * n2
    flat_x = bg_x.ravel()
    rows = np.empty(4, np.int64)
    owner_rows = np.empty(4, np.int64)
    owner_desc = np.empty(4, np.int64)
    capacity = 64
    work = np.empty(2 * capacity, np.int64)  # the working column at [cur, cur + size), spare half at nxt
    pool = np.empty(4096, np.int64)
    pool_used = 0
    zero = np.empty(64, np.int64)
    n_zero = 0
    for value in (0, 1):
        squares = columns0_list if value == 0 else visit
        for i in range(squares.size):
            square = squares[i]
            if value == 1:
                if square % 3 and _implicit(square, flat_x, kinds, plane, n2):
                    continue
                current = square
            else:
                current = -1
            count = _square_rows(flat_x, square, n1, n2, rows)
            if count == 0:
                continue
            pivot = rows[count - 1]
            if _owner(pivot, current, pivot_owner, flat_x, kinds, plane, n2) < 0:
                pivot_owner[pivot] = 2 * square
                continue
            cur, nxt = 0, capacity
            size = count
            for j in range(count):
                work[j] = rows[count - 1 - j]
            while True:
                if size == 0:
                    if value == 1:
                        if n_zero == zero.size:
                            grown_zero = np.empty(2 * zero.size, np.int64)
                            grown_zero[:n_zero] = zero
                            zero = grown_zero
                        zero[n_zero] = square
                        n_zero += 1
                    break
                pivot = work[cur]
                owner = _owner(pivot, current, pivot_owner, flat_x, kinds, plane, n2)
                if owner < 0:  # a new pivot: store [length, pivot, the others descending]
                    if 2 * pool_used + 1 > owner_limit:
                        raise OverflowError("Betti matching: reduced columns exceed the pivot index range")
                    if pool_used + size + 1 > pool.size:
                        grown = np.empty(2 * (pool_used + size + 1), np.int64)
                        grown[:pool_used] = pool[:pool_used]
                        pool = grown
                    pivot_owner[pivot] = 2 * pool_used + 1
                    pool[pool_used] = size
                    for j in range(size):
                        pool[pool_used + 1 + j] = work[cur + j]
                    pool_used += size + 1
                    break
                # add the owner's reduced column (descending); its pivot cancels this one
                if owner & 1 == 0:
                    other_size = _square_rows(flat_x, owner >> 1, n1, n2, owner_rows)
                    for j in range(other_size):
                        owner_desc[j] = owner_rows[other_size - 1 - j]
                    other = owner_desc
                    other_start = 0
                else:
                    other = pool
                    other_start = (owner >> 1) + 1
                    other_size = pool[owner >> 1]
                if size + other_size > capacity:
                    capacity = 2 * (size + other_size)
                    grown = np.empty(2 * capacity, np.int64)
                    grown[:size] = work[cur:cur + size]
                    work = grown
                    cur, nxt = 0, capacity
                a, b, n = 0, 0, 0
                while a < size and b < other_size:
                    left = work[cur + a]
                    right = other[other_start + b]
                    if left > right:
                        work[nxt + n] = left
                        n += 1
                        a += 1
                    elif right > left:
                        work[nxt + n] = right
                        n += 1
                        b += 1
                    else:
                        a += 1
                        b += 1
                while a < size:
                    work[nxt + n] = work[cur + a]
                    n += 1
                    a += 1
                while b < other_size:
                    work[nxt + n] = other[other_start + b]
                    n += 1
                    b += 1
                cur, nxt = nxt, cur
                size = n
    return zero[:n_zero]


def _forest_scratch(bg_c: np.ndarray, scratch: Scratch):
    n_cubes = int(np.prod([max(n - 1, 0) for n in bg_c.shape]))
    n_squares = 3 * bg_c.size
    return (scratch.get("parent", n_cubes + 1, index_dtype(n_cubes + 1)), scratch.get("rank", n_cubes + 1, np.uint8),
            scratch.get("parity", n_cubes + 1, np.uint64), scratch.get("kinds", n_squares, np.uint8))


def _zero_squares_of(bg_x: np.ndarray, bg_c: np.ndarray, parent: np.ndarray, rank: np.ndarray, kinds: np.ndarray,
                     stop: int, scratch: Scratch) -> np.ndarray:
    """Z_X (value-1 squares, increasing) up to the square ``stop``, from the comparison forest
    (``parent``, ``rank``: modified) and its square kinds (modified: the marks of X's value-0 block)."""
    n_squares = kinds.size
    value0_column_marks(bg_x, bg_c, parent, rank, kinds)
    columns0_list = _squares_of_kind(kinds, VALUE0_COLUMN, n_squares)
    _mark_near_value0(kinds, columns0_list, bg_c.shape[1], bg_c.shape[2])
    visit = _squares_of_kind(kinds, NEGATIVE_VISIT, min(stop + 1, n_squares))
    pivot_owner = scratch.get("pivot_owner", n_squares, index_dtype(2 * n_squares + 2))
    pivot_owner.fill(-1)
    return zero_squares(bg_x, kinds, columns0_list, visit, pivot_owner, np.iinfo(pivot_owner.dtype).max)


def matched_dim1_linked(bg_a: np.ndarray, bg_b: np.ndarray, bg_c: np.ndarray, link_squares: np.ndarray,
                        link_bits: np.ndarray, scratch: Scratch | None = None) -> int:
    """m_1 of one tile, equal to :func:`vesuvius_lab.core.metric.betti_dim1.matched_dim1`, with the label's
    (``bg_b``) chains from :func:`killing_chains`: Z_b comes out of the comparison forest, and the
    prediction's reduction runs only when Z_b is not empty, up to its last square, visiting only the
    columns that are not implicit."""
    scratch = scratch or Scratch()
    parent, rank, parity, kinds = _forest_scratch(bg_c, scratch)
    killed_b = forest_with_linking(bg_c, parent, rank, parity, kinds, link_squares, link_bits)
    if killed_b.size == 0:
        return 0
    zero_a = _zero_squares_of(bg_a, bg_c, parent, rank, kinds, int(killed_b.max()), scratch)
    return int(np.intersect1d(zero_a, killed_b).size)


def matched_dim1_fast(bg_a: np.ndarray, bg_b: np.ndarray, bg_c: np.ndarray, scratch: Scratch | None = None) -> int:
    """m_1 of one tile, equal to :func:`vesuvius_lab.core.metric.betti_dim1.matched_dim1`, with both
    inputs reduced (a label tile without chains), by the same shortcuts: the forest's closed squares
    and the implicit columns."""
    scratch = scratch or Scratch()
    parent, rank, parity, kinds = _forest_scratch(bg_c, scratch)
    empty = np.empty(0, np.int64)
    forest_with_linking(bg_c, parent, rank, parity, kinds, empty, np.empty(0, np.uint64))
    zero_b = _zero_squares_of(bg_b, bg_c, parent.copy(), rank.copy(), kinds.copy(), kinds.size, scratch)
    if zero_b.size == 0:
        return 0
    zero_a = _zero_squares_of(bg_a, bg_c, parent, rank, kinds, int(zero_b.max()), scratch)
    return int(np.intersect1d(zero_a, zero_b).size)
