"""The competition score: ``0.30 * TopoScore + 0.35 * SurfaceDice + 0.35 * VOI_score`` per volume.

Betti matching for the TopoScore (numba kernels), SurfaceDice at a tolerance of 2 voxels, the VOI
score, and ``vlab evaluate`` over folders of masks. :func:`score_volume` and :func:`mean_scores`
are the entry points.

May import: the root of core, ``contract``, ``config`` and ``data``.
"""

from vesuvius_lab.core.metric.score import IGNORE_LABEL, SURFACE_TOLERANCE, VolumeScore, mean_scores, score_volume

__all__ = ["IGNORE_LABEL", "SURFACE_TOLERANCE", "VolumeScore", "mean_scores", "score_volume"]
