"""Validation: predict whole volumes, run the post-processing chain, score with the competition metric.

The score is recorded after the plain threshold and after every post-processing step, so the
leaderboard and reports can show what each step added. The last step's score is the run's score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from vesuvius_lab.core.inference.postprocess import Chain
from vesuvius_lab.core.metric.score import mean_scores, score_volume

#: uint8 CT volume (D, H, W) -> float32 surface probabilities (D, H, W)
VolumePredictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class ValidationResult:
    mean: dict  # competition score components of the final mask, averaged over volumes
    volumes: list[dict]  # per volume: id and score components of the final mask
    steps: dict[str, float]  # mean score after the threshold alone and after each step

    @property
    def score(self) -> float:
        return float(self.mean["score"])

    def to_dict(self) -> dict:
        return {"mean": self.mean, "volumes": self.volumes, "steps": self.steps}


#: The step label of the input's own score, recorded when the input is itself a mask (hole stitching).
INPUT_LABEL = "input"
#: The step label of the chain's mask merged back into the input mask (hole stitching).
MERGED_LABEL = "merged"

#: (input mask, predicted mask) -> the mask a repairing model's post-processing step would give
InputMerge = Callable[[np.ndarray, np.ndarray], np.ndarray]


def validate(predict: VolumePredictor, cases: Iterable[tuple[str, np.ndarray, np.ndarray]], chain: Chain,
             *, ignore_label: int | None = 2, score_input: bool = False, merge_input: InputMerge | None = None,
             on_volume: Callable[[str], None] | None = None) -> ValidationResult:
    """Score ``predict`` on ``(id, image, label)`` cases after each step of ``chain``.

    ``score_input`` also scores the input itself (for inputs that are masks, e.g. damaged labels),
    so the steps show what the model added over it. ``merge_input`` adds a last step, "merged": the
    chain's mask merged into the input mask, which is what a repairing model does when it is used.
    """
    labels = ([INPUT_LABEL] if score_input else []) + chain.labels + ([MERGED_LABEL] if merge_input else [])
    per_step: dict[str, list] = {label: [] for label in labels}
    volumes = []
    for volume_id, image, label in cases:
        if score_input:
            per_step[INPUT_LABEL].append(score_volume(np.asarray(image), np.asarray(label), ignore_label=ignore_label))
        probabilities = predict(np.asarray(image))
        final = None
        for step_label, mask in chain.apply_steps(probabilities):
            final = score_volume(mask, np.asarray(label), ignore_label=ignore_label)
            per_step[step_label].append(final)
        if merge_input is not None:
            final = score_volume(merge_input(np.asarray(image), mask), np.asarray(label), ignore_label=ignore_label)
            per_step[MERGED_LABEL].append(final)
        volumes.append({"id": volume_id, **final.to_dict()})
        if on_volume:
            on_volume(volume_id)
    steps = {label: float(mean_scores(scores)["score"]) for label, scores in per_step.items() if scores}
    final_label = labels[-1]
    return ValidationResult(mean_scores(per_step[final_label]), volumes, steps)
