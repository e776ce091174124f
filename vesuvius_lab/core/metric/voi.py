"""Variation of information between the 26-connected components of two masks.

Equal to scikit-image's ``variation_of_information(label_components, pred_components)`` on the
voxels where either mask is foreground (entropies in bits): split = H(pred | label),
merge = H(label | pred). One compiled pass over the volume counts the component sizes and the
voxels covered by one mask only, and collects the (label, pred) ids of the voxels both cover;
their contingency cells are then counted in linear time, without sorting.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def components(mask: np.ndarray) -> np.ndarray:
    """26-connected components of a boolean mask (labels 1..N, 0 = background)."""
    import cc3d

    return cc3d.connected_components(np.asarray(mask, bool), connectivity=26, out_dtype=np.uint32)


@njit(cache=True)
def _count_cells(label_ids, pred_ids, n_label, n_pred, n_both):
    """One pass over the volume: component sizes over the covered voxels (index 0: voxels the
    other side alone covers), voxels each component covers alone, and the (label, pred) ids of
    the ``n_both`` voxels both sides cover."""
    label_sizes = np.zeros(n_label + 1, np.int64)
    pred_sizes = np.zeros(n_pred + 1, np.int64)
    label_alone = np.zeros(n_label + 1, np.int64)
    pred_alone = np.zeros(n_pred + 1, np.int64)
    both_label = np.empty(n_both, np.int64)
    both_pred = np.empty(n_both, np.int64)
    n = 0
    for i in range(label_ids.size):
        label, pred = label_ids[i], pred_ids[i]
        if label == 0 and pred == 0:
            continue
        label_sizes[label] += 1
        pred_sizes[pred] += 1
        if pred == 0:
            label_alone[label] += 1
        elif label == 0:
            pred_alone[pred] += 1
        else:
            both_label[n] = label
            both_pred[n] = pred
            n += 1
    return label_sizes, pred_sizes, label_alone, pred_alone, both_label, both_pred


@njit(cache=True)
def _pair_cells(both_label, both_pred, n_label, n_pred):
    """The non-empty (label, pred) cells and their counts, in linear time: bucket the voxels by
    label, then count each bucket's pred ids with a stamp array."""
    starts = np.zeros(n_label + 2, np.int64)
    for label in both_label:
        starts[label + 1] += 1
    for label in range(1, n_label + 2):
        starts[label] += starts[label - 1]
    bucket = np.empty(both_pred.size, np.int64)
    fill = starts.copy()
    for i in range(both_label.size):
        bucket[fill[both_label[i]]] = both_pred[i]
        fill[both_label[i]] += 1
    stamp = np.full(n_pred + 1, -1, np.int64)  # label whose bucket last counted this pred id
    slot = np.empty(n_pred + 1, np.int64)
    cell_label = np.empty(both_pred.size, np.int64)
    cell_pred = np.empty(both_pred.size, np.int64)
    cell_count = np.zeros(both_pred.size, np.int64)
    n_cells = 0
    for label in range(1, n_label + 1):
        for i in range(starts[label], starts[label + 1]):
            pred = bucket[i]
            if stamp[pred] != label:
                stamp[pred] = label
                slot[pred] = n_cells
                cell_label[n_cells] = label
                cell_pred[n_cells] = pred
                n_cells += 1
            cell_count[slot[pred]] += 1
    return cell_label[:n_cells], cell_pred[:n_cells], cell_count[:n_cells]


def voi_split_merge(pred: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(split, merge) in bits for two boolean masks; (0, 0) when both are empty."""
    label_ids = components(label)
    pred_ids = components(pred)
    n_label, n_pred = int(label_ids.max(initial=0)), int(pred_ids.max(initial=0))
    n_both = int(np.count_nonzero(np.logical_and(pred, label)))
    return split_merge_of_components(label_ids, n_label, pred_ids, n_pred, n_both)


def split_merge_of_components(label_ids: np.ndarray, n_label: int, pred_ids: np.ndarray, n_pred: int,
                              n_both: int) -> tuple[float, float]:
    """(split, merge) from the component ids of both masks (0 = background, 1..n) and the number of
    voxels both masks cover; :func:`voi_split_merge` computes them, a prepared label reuses its own."""
    label_sizes, pred_sizes, label_alone, pred_alone, both_label, both_pred = _count_cells(
        label_ids.ravel(), pred_ids.ravel(), n_label, n_pred, n_both)
    covered = int(label_sizes.sum())
    if covered == 0:
        return 0.0, 0.0
    # the non-empty cells of the contingency table: (label, pred), (label, 0) and (0, pred)
    pair_label, pair_pred, pair_counts = _pair_cells(both_label, both_pred, n_label, n_pred)
    label_alone_ids, pred_alone_ids = np.flatnonzero(label_alone), np.flatnonzero(pred_alone)
    counts = np.concatenate((pair_counts, label_alone[label_alone_ids], pred_alone[pred_alone_ids]))
    label_of = np.concatenate((pair_label, label_alone_ids, np.zeros(pred_alone_ids.size, np.int64)))
    pred_of = np.concatenate((pair_pred, np.zeros(label_alone_ids.size, np.int64), pred_alone_ids))
    counts = counts.astype(np.float64)
    fraction = counts / covered
    split = -np.sum(fraction * np.log2(counts / label_sizes[label_of]))
    merge = -np.sum(fraction * np.log2(counts / pred_sizes[pred_of]))
    return float(split) + 0.0, float(merge) + 0.0  # + 0.0 turns -0.0 into 0.0
