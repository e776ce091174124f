"""A label prepared once and scored against many predictions: the same numbers as :func:`score_volume`.

Tuning a post-processing chain scores hundreds of trials of the same out-of-fold volumes against the
same labels. :meth:`PreparedLabel.from_label` computes what depends on the label alone, once;
:meth:`PreparedLabel.score` returns exactly what ``score_volume(pred, label, ignore_label=...)``
returns (tests/test_prepared_label.py compares every field, floats bit for bit).

What is reused, per part of the score:

* masks: the label's foreground and the voxels it ignores (cleared from each prediction).
* SurfaceDice: the label's surface elements (grid corners with a mixed 2x2x2 neighbourhood) with
  their area codes and total area, and one bit per corner: within the tolerance ball of a label
  element. Per trial only the prediction's corners are computed; its half of the overlap is a bit
  lookup, the label's half still looks for prediction surface in the ball of each label element.
  The sums run in the same order as :func:`surface_dice`'s (which crops to the bounding box of both
  masks: the corners outside it are surface in neither), so the value is the same float.
* VOI: the label's 26-connected components. The contingency table is joint, and the label's
  entropy term is taken over the voxels either mask covers (so it depends on the prediction): the
  rest runs per trial, with :func:`voi_split_merge`'s own arithmetic.
* TopoScore, per tile of the 2x2x2 split: the label's Betti numbers (g_k); its background
  components and cavities where it has cavities (m_2); and for m_1 the label's tunnel chains of
  :mod:`vesuvius_lab.core.metric.betti_linking`, with which the label's half of the matching
  (Z_label) falls out of the comparison forest instead of a column reduction per trial.

What stays per trial, and why: the prediction's own Betti numbers; m_0, a union-find over the common
background of both masks (done by :mod:`vesuvius_lab.core.metric.betti_dim0_runs`, which skips the
edges that cannot merge); the comparison forest of m_1 (the dual graph is the common background)
and the prediction's reduction, which runs only up to the last square of Z_label and skips the
columns that are certainly emergent; m_2's common-background components. These are exact
re-arrangements of the work in :mod:`vesuvius_lab.core.metric.betti`, not approximations. A label
tile with more than 64 tunnels has no chains: both halves of its m_1 are reduced per trial.

The object holds numpy arrays and numbers: it pickles (the boolean masks packed to bits), to be sent
once to each worker process. The dimension-1 kernels keep ~110 MB of work arrays per thread between
trials (:func:`release_scratch` frees them).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from vesuvius_lab.core.metric.betti import (DIMENSIONS, BettiCounts, _Background, _betti_numbers, _matched_dim2,
                                            tile_slices, timed)
from vesuvius_lab.core.metric.score import (IGNORE_LABEL, SURFACE_DICE_WEIGHT, SURFACE_TOLERANCE, TOPO_WEIGHT,
                                            VOI_WEIGHT, VolumeScore, topo_score, voi_score)
from vesuvius_lab.core.metric.surface_dice import near_surface

# --------------------------------------------------------------------------- SurfaceDice halves


@njit(cache=True)
def _surface_corners(codes):
    """Flat indices (raster order) of the corners whose code is a surface (neither 0 nor 255)."""
    flat = codes.ravel()
    count = 0
    for i in range(flat.size):
        if flat[i] != 0 and flat[i] != 255:
            count += 1
    out = np.empty(count, np.int64)
    count = 0
    for i in range(flat.size):
        if flat[i] != 0 and flat[i] != 255:
            out[count] = i
            count += 1
    return out


@njit(cache=True)
def _total_area(surface_codes, areas):
    """The summed area of the surface elements, in raster order as ``_surface_overlap`` adds it."""
    total = 0.0
    for i in range(surface_codes.size):
        total += areas[surface_codes[i]]
    return total


@njit(cache=True)
def _near_bits(shape, surface_index, offsets):
    """One bit per grid corner (little-endian bytes): within the offsets of a surface corner."""
    n0, n1, n2 = shape
    bits = np.zeros((n0 * n1 * n2 + 7) // 8, np.uint8)
    for i in range(surface_index.size):
        index = surface_index[i]
        x, rest = divmod(index, n1 * n2)
        y, z = divmod(rest, n2)
        for j in range(offsets.shape[0]):
            ox, oy, oz = x + offsets[j, 0], y + offsets[j, 1], z + offsets[j, 2]
            if ox < 0 or oy < 0 or oz < 0 or ox >= n0 or oy >= n1 or oz >= n2:
                continue
            near = (ox * n1 + oy) * n2 + oz
            bits[near >> 3] |= np.uint8(1 << (near & 7))
    return bits


@njit(cache=True)
def _label_overlap(surface_index, surface_codes, other_codes, areas, offsets):
    """The label half of ``_surface_overlap``: area of the label elements with prediction surface
    within the offsets (same order, same early stop)."""
    _, n1, n2 = other_codes.shape
    overlap = 0.0
    for i in range(surface_index.size):
        index = surface_index[i]
        x, rest = divmod(index, n1 * n2)
        y, z = divmod(rest, n2)
        if near_surface(other_codes, x, y, z, offsets):
            overlap += areas[surface_codes[i]]
    return overlap


@njit(cache=True)
def _pred_overlap(codes, near_bits, areas):
    """The prediction half of ``_surface_overlap``: (its area, its area near the label surface)."""
    flat = codes.ravel()
    total = 0.0
    overlap = 0.0
    for i in range(flat.size):
        code = flat[i]
        if code == 0 or code == 255:
            continue
        area = areas[code]
        total += area
        if (near_bits[i >> 3] >> (i & 7)) & 1:
            overlap += area
    return total, overlap


# --------------------------------------------------------------------------- the prepared label

_THREAD = threading.local()


def _scratch():
    """This thread's work arrays for the dimension-1 kernels (~110 MB for 160^3 tiles), kept
    between tiles and trials: allocating them per tile costs more than the reductions."""
    from vesuvius_lab.core.metric.betti_linking import Scratch

    scratch = getattr(_THREAD, "scratch", None)
    if scratch is None:
        scratch = _THREAD.scratch = Scratch()
    return scratch


def release_scratch() -> None:
    """Free this thread's work arrays (they come back on the next score)."""
    _THREAD.scratch = None


@dataclass
class _LabelTile:
    """The label's part of one tile of the 2x2x2 split."""

    tile: tuple[slice, slice, slice]
    betti: tuple[int, int, int]  # beta_0, beta_1, beta_2 of the label's foreground complex
    background: _Background | None  # kept only where the label has a cavity (m_2 needs it)
    chains: tuple[np.ndarray, np.ndarray] | None  # betti_linking.killing_chains; None: reduce both


def _smallest_uint(count: int) -> type:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if count <= np.iinfo(dtype).max:
            return dtype
    return np.uint64


@dataclass(eq=False)
class PreparedLabel:
    """A label volume with its label-only work done; :meth:`score` equals :func:`score_volume`."""

    shape: tuple[int, int, int]
    ignore_label: int | None
    label_fg: np.ndarray  # bool, after the ignore label is cleared
    keep: np.ndarray | None  # bool, False where the label ignores the voxel; None when nothing is ignored
    # SurfaceDice
    surface_index: np.ndarray  # flat corner indices (raster order) of the label's surface elements
    surface_codes: np.ndarray  # their neighbourhood codes
    surface_total: float
    near_bits: np.ndarray  # corners within the tolerance of a label surface element
    # VOI
    label_ids: np.ndarray  # 26-connected components, smallest unsigned dtype
    n_label: int
    # TopoScore
    tiles: list[_LabelTile] = field(default_factory=list)

    @classmethod
    def from_label(cls, label: np.ndarray, ignore_label: int | None = IGNORE_LABEL) -> PreparedLabel:
        from vesuvius_lab.core.metric.betti_linking import killing_chains
        from vesuvius_lab.core.metric.surface_dice import _ball_offsets, _corner_codes, _surface_area_table
        from vesuvius_lab.core.metric.voi import components

        label = np.asarray(label)
        if label.ndim != 3:
            raise ValueError(f"PreparedLabel needs a 3D label volume, got shape {label.shape}")
        label_fg = label != 0
        keep = None
        if ignore_label is not None:
            keep = label != ignore_label
            label_fg &= keep
            if keep.all():
                keep = None

        codes = _corner_codes(np.ascontiguousarray(label_fg).view(np.uint8))
        surface_index = _surface_corners(codes)
        surface_codes = codes.ravel()[surface_index]
        areas, offsets = _surface_area_table(), _ball_offsets(float(SURFACE_TOLERANCE))
        near_bits = _near_bits(codes.shape, surface_index, offsets)
        surface_total = float(_total_area(surface_codes, areas))
        index_type = np.int32 if codes.size <= np.iinfo(np.int32).max else np.int64
        del codes

        ids = components(label_fg)
        n_label = int(ids.max(initial=0))
        label_ids = ids.astype(_smallest_uint(n_label))
        del ids

        tiles = []
        for tile in tile_slices(label.shape):
            fg_b = np.ascontiguousarray(label_fg[tile]).view(np.uint8)
            if fg_b.size == 0:
                continue
            betti, background = _betti_numbers(fg_b)
            chains = killing_chains(background.mask, betti[1]) if betti[1] > 0 else None
            tiles.append(_LabelTile(tile, betti, background if betti[2] > 0 else None, chains))
        return cls(shape=tuple(int(n) for n in label.shape), ignore_label=ignore_label, label_fg=label_fg, keep=keep,
                   surface_index=surface_index.astype(index_type), surface_codes=surface_codes,
                   surface_total=surface_total, near_bits=near_bits, label_ids=label_ids, n_label=n_label,
                   tiles=tiles)

    @property
    def nbytes(self) -> int:
        """Bytes held in arrays (the object's memory, give or take a few hundred bytes)."""
        arrays = [self.label_fg, self.keep, self.surface_index, self.surface_codes, self.near_bits, self.label_ids]
        for tile in self.tiles:
            if tile.background is not None:
                arrays += [tile.background.mask, tile.background.labels, tile.background.cavity]
            if tile.chains is not None:
                arrays += list(tile.chains)
        return int(sum(a.nbytes for a in arrays if a is not None))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["label_fg"] = None  # the components' ids give it back
        if self.keep is not None:
            state["keep"] = np.packbits(self.keep)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.label_fg = self.label_ids != 0
        if self.keep is not None:
            self.keep = np.unpackbits(self.keep, count=int(np.prod(self.shape))).view(bool).reshape(self.shape)

    # ----------------------------------------------------------------------- scoring

    def foreground(self, pred: np.ndarray) -> np.ndarray:
        """The prediction's surface mask: non-zero voxels, those the label ignores cleared."""
        pred = np.asarray(pred)
        if pred.shape != self.shape:
            raise ValueError(f"score_volume needs two 3D volumes of one shape, got {pred.shape} and {self.shape}")
        pred_fg = pred != 0
        if self.keep is not None:
            pred_fg &= self.keep
        return pred_fg

    def score(self, pred: np.ndarray, *, timings: dict[str, float] | None = None) -> VolumeScore:
        """``score_volume(pred, label, ignore_label=...)`` for the prepared label; ``timings`` as there."""
        pred_fg = self.foreground(pred)
        with timed(timings, "surface_dice"):
            dice = self.surface_dice(pred_fg)
        with timed(timings, "voi"):
            split, merge = self.voi_split_merge(pred_fg)
        betti = self.betti_counts(pred_fg, timings=timings)

        topo, voi = topo_score(betti), voi_score(split, merge)
        total = TOPO_WEIGHT * topo + SURFACE_DICE_WEIGHT * dice + VOI_WEIGHT * voi
        return VolumeScore(score=float(np.clip(total, 0.0, 1.0)), topo_score=topo, surface_dice=dice,
                           voi_score=voi, voi_split=split, voi_merge=merge, betti=betti)

    def surface_dice(self, pred_fg: np.ndarray) -> float:
        """:func:`surface_dice` (tolerance :data:`SURFACE_TOLERANCE`) of a prediction mask."""
        from vesuvius_lab.core.metric.surface_dice import _ball_offsets, _corner_codes, _surface_area_table

        pred_any, label_any = bool(pred_fg.any()), self.surface_index.size > 0  # a non-empty mask has surface
        if not (pred_any or label_any):
            return 1.0
        if not pred_any or not label_any:
            return 0.0
        codes = _corner_codes(np.ascontiguousarray(pred_fg).view(np.uint8))
        areas, offsets = _surface_area_table(), _ball_offsets(float(SURFACE_TOLERANCE))
        overlap_label = _label_overlap(self.surface_index, self.surface_codes, codes, areas, offsets)
        total_pred, overlap_pred = _pred_overlap(codes, self.near_bits, areas)
        return float((overlap_label + overlap_pred) / (self.surface_total + total_pred))

    def voi_split_merge(self, pred_fg: np.ndarray) -> tuple[float, float]:
        """:func:`voi_split_merge` of a prediction mask against the label."""
        from vesuvius_lab.core.metric.voi import components, split_merge_of_components

        pred_ids = components(pred_fg)
        n_pred = int(pred_ids.max(initial=0))
        n_both = int(np.count_nonzero(np.logical_and(pred_fg, self.label_fg)))
        return split_merge_of_components(self.label_ids, self.n_label, pred_ids, n_pred, n_both)

    def betti_counts(self, pred_fg: np.ndarray, *, timings: dict[str, float] | None = None) -> BettiCounts:
        """:func:`tiled_betti_counts` of a prediction mask against the label."""
        total = {k: (0, 0, 0) for k in DIMENSIONS}
        for label_tile in self.tiles:
            counts = self._tile_counts(pred_fg[label_tile.tile], label_tile, timings)
            total = {k: tuple(x + y for x, y in zip(total[k], counts[k])) for k in DIMENSIONS}
        return total

    def _tile_counts(self, pred_tile: np.ndarray, label_tile: _LabelTile,
                     timings: dict[str, float] | None) -> BettiCounts:
        """``betti._tile_counts`` with the label's side taken from ``label_tile``."""
        from vesuvius_lab.core.metric.betti_dim0_runs import matched_dim0_fast
        from vesuvius_lab.core.metric.betti_linking import matched_dim1_fast, matched_dim1_linked

        fg_a = np.ascontiguousarray(pred_tile, dtype=bool).view(np.uint8)
        fg_b = np.ascontiguousarray(self.label_fg[label_tile.tile]).view(np.uint8)
        with timed(timings, "betti_numbers"):
            betti_a, bg_a = _betti_numbers(fg_a)
        betti_b = label_tile.betti
        p = [max(betti_a[0] - 1, 0), betti_a[1], betti_a[2]]
        g = [max(betti_b[0] - 1, 0), betti_b[1], betti_b[2]]
        m = [0, 0, 0]
        if min(p[0], g[0]) > 0:
            with timed(timings, "dim0"):
                m[0] = matched_dim0_fast(fg_a, fg_b)
        if min(p[2], g[2]) > 0:
            with timed(timings, "dim2"):
                m[2] = _matched_dim2(bg_a, label_tile.background)
        if min(p[1], g[1]) > 0:
            with timed(timings, "dim1"):
                bg_b = (fg_b == 0).view(np.uint8)
                bg_c = bg_a.mask & bg_b
                if label_tile.chains is not None:
                    m[1] = matched_dim1_linked(bg_a.mask, bg_b, bg_c, *label_tile.chains, scratch=_scratch())
                else:
                    m[1] = matched_dim1_fast(bg_a.mask, bg_b, bg_c, scratch=_scratch())
        return {k: (m[k], p[k], g[k]) for k in DIMENSIONS}


def warm_up() -> None:
    """Compile the prepared label's kernels, or load them from numba's cache (as
    :func:`vesuvius_lab.core.metric.score.warm_up` does for :func:`score_volume`'s): call it once
    before starting worker processes."""
    from vesuvius_lab.core.metric.score import warm_up as warm_up_score

    warm_up_score()
    rng = np.random.default_rng(0)
    label = (rng.random((12, 12, 12)) < 0.5).astype(np.uint8)  # tunnels in every tile
    label[:2] = 2
    pred = rng.random((12, 12, 12)) < 0.5
    PreparedLabel.from_label(label).score(pred)  # label chains, linked m_1
    dense = (rng.random((24, 24, 24)) < 0.6).astype(np.uint8)  # more tunnels than chains hold
    PreparedLabel.from_label(dense).score(rng.random((24, 24, 24)) < 0.6)
