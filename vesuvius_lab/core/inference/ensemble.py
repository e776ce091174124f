"""Ensembles: the surface probabilities of several trained runs combined, scored and recorded like a run.

An experiment file with an ``[ensemble]`` table instead of ``[model]``::

    name = "quick-ensemble"
    [ensemble]
    members = [
      { experiment = "quick-unet25d", folds = "all" },    # every fold run of an experiment
      "runs/quick-monai-unet/fold0-20250101-120000",       # or one run directory
    ]
    weights = [2, 1]        # optional, one positive weight per member
    combine = "weighted"    # "mean" (default), "weighted", or "logit_mean"
    [inference]
    threshold = 0.5         # applied to the combined probabilities, then the [[postprocess]] chain

``vlab ensemble FILE`` builds it (:func:`vesuvius_lab.core.training.ensemble_run.build_ensemble`);
this module combines the members' probabilities. Any run that
:func:`~vesuvius_lab.core.inference.run_kinds.load_run` opens can be a member, whatever its kind
(torch models, self-training backends such as nnU-Net, other ensembles).

Honest validation: out-of-fold
------------------------------
A fold run never trained on the volumes of its validation fold. For each volume, a member
contributes the predictions of its runs that held that volume out: with ``folds = "all"``, the one
fold run whose validation fold contains it. The ensemble is scored on the training volumes that
every member holds out, so no prediction that is scored comes from a model trained on that
volume. Members trained with the same folds (same ``data.folds`` and ``group_by``) and
``folds = "all"`` give a score over every training volume. For any other volume (test volumes,
``vlab predict``/``vlab submit``), a member is the average of all its runs, i.e. all its folds.
Predicting a volume the ensemble was scored on gives its out-of-fold prediction again.

Combining
---------
For one volume, member m with weight w_m (1 without weights) and the runs R_m that count::

    mean, weighted:  p = sum_m w_m * mean_{r in R_m} p_r / sum_m w_m
    logit_mean:      p = sigmoid(sum_m w_m * mean_{r in R_m} logit(p_r) / sum_m w_m)

It streams, one member run at a time, slab by slab of its cached float16 probabilities, into a
float32 running sum: memory holds the sum plus the member run being added.

Each member run predicts a volume once: :mod:`vesuvius_lab.core.inference.probability_cache` keeps its
probabilities, so re-weighting or adding a member does not predict the others again.

The record
----------
An ensemble run's folder is described in :mod:`vesuvius_lab.core.training.ensemble_run`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from vesuvius_lab.core.config.spec import Combine
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.ensemble_members import Member, members_from_record
from vesuvius_lab.core.inference.probability_cache import CachedRun, RunLoader, volume_key
from vesuvius_lab.core.runs.folder import Run

MEMBERS_FILE = "members.json"
#: Probabilities are clipped to [EPS, 1 - EPS] before the logit, so 0 and 1 stay finite.
EPS = 1e-6


# --------------------------------------------------------------------------- the arithmetic


def combine(contributions: Iterable[tuple[float, np.ndarray]], mode: Combine, *, slab: int = 8) -> np.ndarray:
    """The weighted mean of probabilities (or of their logits, then a sigmoid), float32 (D, H, W).

    ``contributions`` yields ``(weight, probabilities)`` one at a time; each is added slab by slab
    into a float32 running sum, so only the sum and the array being added are ever in memory.
    """
    running, total = None, 0.0
    for weight, probabilities in contributions:
        if running is None:
            running = np.zeros(probabilities.shape, np.float32)
        elif probabilities.shape != running.shape:
            raise ValueError(f"cannot combine probabilities of shapes {probabilities.shape} and {running.shape}")
        for start in range(0, running.shape[0], slab):
            part = probabilities[start:start + slab].astype(np.float32)  # a copy: the input stays as it is
            if mode == "logit_mean":
                part = logit(part)
            part *= np.float32(weight)
            running[start:start + slab] += part
        total += weight
    if running is None:
        raise ValueError("an ensemble needs at least one member")
    running /= np.float32(total)
    return sigmoid_(running) if mode == "logit_mean" else running


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid_(x: np.ndarray) -> np.ndarray:
    """Sigmoid in place."""
    with np.errstate(over="ignore"):
        np.negative(x, out=x)
        np.exp(x, out=x)
    x += 1
    return np.reciprocal(x, out=x)


# --------------------------------------------------------------------------- predicting


class EnsemblePredictor:
    """The combined probabilities of a volume, each member run's read from its cache or predicted once."""

    def __init__(self, members: list[Member], mode: Combine, *, load: RunLoader | None = None, device: str = "cpu",
                 overrides: dict[str, Any] | None = None, checkpoint_name: str = "best"):
        """``load`` opens a member run that must predict a volume the cache lacks."""
        self.members, self.mode = members, mode
        self.cached = {r.run.path: CachedRun(r.run, r.spec, overrides={**m.inference, **(overrides or {})},
                                             device=device, checkpoint_name=checkpoint_name,
                                             label=f"{m.label} ({r.run.experiment}/{r.run.id})", load=load)
                       for m in members for r in m.runs}
        self.scored_ids: dict[str, str] = {}  # volume key -> id, for the volumes the ensemble was scored on

    def runs_for(self, volume_id: str | None) -> Iterator[tuple[float, CachedRun]]:
        """(weight, run) of every member run that counts for the volume; weights sum to each member's."""
        for member in self.members:
            runs = member.runs_for(volume_id)
            for run in runs:
                yield member.weight / len(runs), self.cached[run.run.path]

    def probabilities(self, volume: np.ndarray, volume_id: str | None = None, key: str | None = None) -> np.ndarray:
        key = key or volume_key(volume)
        volume_id = volume_id or self.scored_ids.get(key)
        shown = volume_id or "the input volume"
        return combine(((weight, cached.get(volume, key, shown)) for weight, cached in self.runs_for(volume_id)),
                       self.mode)

    @property
    def predictions(self) -> int:
        """Member predictions made (not read from the cache) by this object."""
        return sum(cached.predictions for cached in self.cached.values())


def read_members(run: Run) -> tuple[list[Member], dict[str, str]]:
    """The member runs an ensemble run combined and the volumes it was scored on (key -> id)."""
    record = run.read(MEMBERS_FILE)
    if not isinstance(record, dict) or not record.get("members"):
        raise UserError(f"{run.path}: an ensemble run without a readable {MEMBERS_FILE} (it was interrupted "
                        "before it started). Build it again with `vlab ensemble FILE`.")
    members = members_from_record(record["members"], run.path.parent.parent, run)
    return members, {key: volume_id for volume_id, key in (record.get("volumes") or {}).items()}
