"""The competition score of a predicted volume against its label, and the mean over volumes.

Per volume, after the ignore label has been cleared from both volumes (any other non-zero
prediction value is surface)::

    score = clip(0.30 * TopoScore + 0.35 * SurfaceDice + 0.35 * VOI_score, 0, 1)

* SurfaceDice at a tolerance of 2 voxels (:mod:`vesuvius_lab.core.metric.surface_dice`).
* VOI_score = 1 / (1 + 0.3 * (split + merge)) over 26-connected components
  (:mod:`vesuvius_lab.core.metric.voi`).
* TopoScore: Betti matching between the two masks on each tile of a 2x2x2 split
  (:mod:`vesuvius_lab.core.metric.betti`); per dimension k the counts are summed over the tiles and
  scored by an F1, and the F1s of the dimensions with any feature are averaged with weights
  0.34, 0.33, 0.33.

Training validation, ``vlab evaluate`` and the leaderboard all call :func:`score_volume`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from vesuvius_lab.core.metric.betti import BettiCounts, tiled_betti_counts, timed

IGNORE_LABEL = 2
SURFACE_TOLERANCE = 2.0
VOI_ALPHA = 0.3
TOPO_WEIGHT, SURFACE_DICE_WEIGHT, VOI_WEIGHT = 0.30, 0.35, 0.35
DIMENSION_WEIGHTS = {0: 0.34, 1: 0.33, 2: 0.33}
MEAN_FIELDS = ("score", "topo_score", "surface_dice", "voi_score", "voi_split", "voi_merge")


@dataclass(frozen=True)
class VolumeScore:
    """The score of one volume and its parts; ``betti[k] = (matched, pred, label)``."""

    score: float
    topo_score: float
    surface_dice: float
    voi_score: float
    voi_split: float
    voi_merge: float
    betti: BettiCounts = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: Betti counts keyed "0", "1", "2" as [matched, pred, label]."""
        data = asdict(self)
        data["betti"] = {str(k): list(v) for k, v in sorted(self.betti.items())}
        return data


def foreground_masks(pred: np.ndarray, label: np.ndarray,
                     ignore_label: int | None = IGNORE_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """Boolean surface masks: non-zero voxels, with those the label ignores cleared in both."""
    pred_fg, label_fg = pred != 0, label != 0
    if ignore_label is not None:
        keep = label != ignore_label
        pred_fg &= keep
        label_fg &= keep
    return pred_fg, label_fg


def dimension_f1(matched: int, pred: int, label: int) -> float | None:
    """F1 of one homology dimension; None when neither side has a feature (dimension skipped)."""
    if pred + label == 0:
        return None
    if label == 0:
        return 0.5 / (pred + label + 0.5)  # a small reward for predicting few spurious features
    return 2.0 * matched / (pred + label)


def topo_score(betti: BettiCounts) -> float:
    """Weighted mean F1 over the dimensions with features; 1.0 when there are none."""
    weighted, weights = 0.0, 0.0
    for k, weight in DIMENSION_WEIGHTS.items():
        f1 = dimension_f1(*betti.get(k, (0, 0, 0)))
        if f1 is not None:
            weighted += weight * f1
            weights += weight
    return weighted / weights if weights else 1.0


def voi_score(split: float, merge: float) -> float:
    return 1.0 / (1.0 + VOI_ALPHA * (split + merge))


def score_volume(pred: np.ndarray, label: np.ndarray, *, ignore_label: int | None = IGNORE_LABEL,
                 timings: dict[str, float] | None = None) -> VolumeScore:
    """Score a predicted volume (any non-zero voxel is surface) against its label (0, 1, and
    ``ignore_label``). ``timings``, when given, accumulates CPU seconds per part: surface_dice,
    voi, betti_numbers, dim0, dim1, dim2."""
    from vesuvius_lab.core.metric.surface_dice import surface_dice
    from vesuvius_lab.core.metric.voi import voi_split_merge

    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape or pred.ndim != 3:
        raise ValueError(f"score_volume needs two 3D volumes of one shape, got {pred.shape} and {label.shape}")
    pred_fg, label_fg = foreground_masks(pred, label, ignore_label)

    with timed(timings, "surface_dice"):
        dice = surface_dice(pred_fg, label_fg, SURFACE_TOLERANCE)
    with timed(timings, "voi"):
        split, merge = voi_split_merge(pred_fg, label_fg)
    betti = tiled_betti_counts(pred_fg, label_fg, timings=timings)

    topo, voi = topo_score(betti), voi_score(split, merge)
    total = TOPO_WEIGHT * topo + SURFACE_DICE_WEIGHT * dice + VOI_WEIGHT * voi
    return VolumeScore(score=float(np.clip(total, 0.0, 1.0)), topo_score=topo, surface_dice=dice,
                       voi_score=voi, voi_split=split, voi_merge=merge, betti=betti)


def warm_up() -> None:
    """Compile every kernel of the score, or load it from numba's cache: call it once before
    starting worker processes, so that they do not each compile on a fresh installation."""
    from vesuvius_lab.core.metric.betti import betti_counts

    rng = np.random.default_rng(0)
    noisy = [(rng.random((10, 10, 10)) < 0.5).astype(np.uint8) for _ in range(2)]  # dimensions 0 and 1
    hollow = np.ones((7, 7, 7), np.uint8)
    hollow[1:6, 1:6, 1:6] = 0
    hollow[3, 3, 3] = 1  # a cavity: dimension 2
    betti_counts(*noisy)
    betti_counts(hollow, hollow)
    score_volume(*noisy)


def mean_scores(scores: Sequence[VolumeScore]) -> dict[str, float | int]:
    """The leaderboard number (``score``) and the mean of every part, with the volume count."""
    if not scores:
        raise ValueError("mean_scores needs at least one volume score")
    means: dict[str, float | int] = {"n_volumes": len(scores)}
    for name in MEAN_FIELDS:
        means[name] = float(np.mean([getattr(s, name) for s in scores]))
    return means
