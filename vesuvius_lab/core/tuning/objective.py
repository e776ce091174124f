"""What a search maximises: one number from the per-volume scores of a chain, and how volumes are grouped.

The mean over volumes rewards a chain that is best on volumes like the ones it was tuned on. A
chain is used on other scrolls, scanned and labelled differently; the two other objectives score a
chain by how it holds across *groups* of volumes (their scrolls, or the folds that held them out
when they all come from one scroll):

``mean``
    the mean score over volumes.
``worst_group``
    the mean score of the worst group: a chain is as good as it is on the group it suits least.
``mean_minus_std``
    the mean of the group means minus ``k`` standard deviations of them: the mean, penalised for
    a chain whose score swings from group to group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, get_args

import numpy as np

from vesuvius_lab.core.config.spec import TuneOptions

OBJECTIVES: tuple[str, ...] = get_args(TuneOptions.model_fields["objective"].annotation)


@dataclass(frozen=True)
class Objective:
    """An objective over a fixed map of volume -> group."""

    kind: str
    groups: Mapping[str, str]  # volume id -> its group
    k: float = 1.0

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.kind!r}; one of {', '.join(OBJECTIVES)}")

    def value(self, scores: Mapping[str, float]) -> float:
        """The objective of a chain whose score on each volume is ``scores[id]``."""
        if self.kind == "mean":
            return float(np.mean(list(scores.values())))
        means = np.array(list(group_means(scores, self.groups).values()))
        if self.kind == "worst_group":
            return float(means.min())
        return float(means.mean() - self.k * means.std())

    def describe(self) -> str:
        return {"mean": "mean over volumes", "worst_group": "worst group's mean",
                "mean_minus_std": f"mean over groups - {self.k:g} std"}[self.kind]


def group_means(scores: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """The mean score of each group of the volumes in ``scores``."""
    members: dict[str, list[float]] = {}
    for volume, score in scores.items():
        members.setdefault(groups[volume], []).append(score)
    return {group: float(np.mean(values)) for group, values in sorted(members.items())}


def volume_groups(scrolls: Mapping[str, str | None], folds: Mapping[str, int], group_by: str) -> tuple[dict[str, str],
                                                                                                         str]:
    """(volume id -> group, what the groups are): by scroll when ``group_by`` is "scroll" and the volumes
    come from two scrolls at least, else by the fold (or pseudo-fold) that held each out."""
    if group_by == "scroll" and len({s for s in scrolls.values() if s}) >= 2 and all(scrolls.values()):
        return {volume: f"scroll {scroll}" for volume, scroll in scrolls.items()}, "scroll"
    return {volume: f"fold {fold}" for volume, fold in folds.items()}, "fold"
