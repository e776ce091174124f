"""``[train] ema`` for nnU-Net's trainers: an average of the weights, validated and saved as the model.

nnU-Net has no weight average of its own. This adds the one vesuvius-lab's trainer keeps
(:class:`vesuvius_lab.core.training.weight_average.WeightAverage`, updated after every
optimizer step) to any nnU-Net trainer instance, without subclassing:

* validation (pseudo-Dice, so the choice of ``checkpoint_best``) runs on the average, and every
  checkpoint nnU-Net writes holds the average as its ``network_weights``: what prediction loads;
* the raw weights and the number of updates are saved beside each checkpoint
  (``<checkpoint>.raw``), so a resumed training goes on from the raw weights with the average
  where it was;
* after the last epoch the network keeps the average (nnU-Net's final validation uses it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vesuvius_lab.core.training.weight_average import WeightAverage

#: Beside each nnU-Net checkpoint: the raw weights and the average's update count.
RAW_SUFFIX = ".raw"
FINAL_CHECKPOINT = "checkpoint_final.pth"


def _network(trainer: Any) -> torch.nn.Module:
    """The trainer's network without its DDP and torch.compile wrappers."""
    network = trainer.network
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def _copy(state: dict) -> dict:
    return {key: value.detach().clone() for key, value in state.items()}


def add_weight_average(trainer: Any, decay: float) -> None:
    """Give ``trainer`` (an nnU-Net trainer, not yet trained) an average of its weights with ``decay``."""
    state: dict[str, Any] = {"average": None, "raw": None}  # raw: the training weights while the average is in
    originals = {name: getattr(trainer, name) for name in (
        "train_step", "on_validation_epoch_start", "on_epoch_end", "on_train_end", "save_checkpoint",
        "load_checkpoint")}

    def average() -> WeightAverage:
        if state["average"] is None:
            state["average"] = WeightAverage(_network(trainer), decay)
        return state["average"]

    def swap_in() -> None:
        if state["raw"] is None:
            network = _network(trainer)
            state["raw"] = _copy(network.state_dict())
            network.load_state_dict(average().model.state_dict())

    def swap_back() -> None:
        if state["raw"] is not None:
            _network(trainer).load_state_dict(state["raw"])
            state["raw"] = None

    def train_step(batch: dict) -> dict:
        result = originals["train_step"](batch)
        average().update(_network(trainer))
        return result

    def on_validation_epoch_start() -> None:
        swap_in()
        originals["on_validation_epoch_start"]()

    def on_epoch_end() -> None:
        originals["on_epoch_end"]()  # checkpoints (best, latest) are written here: with the average in
        swap_back()

    def on_train_end() -> None:
        swap_in()  # the final checkpoint, and what the network is from now on
        originals["on_train_end"]()

    def save_checkpoint(filename: str) -> None:
        originals["save_checkpoint"](filename)
        if trainer.local_rank == 0 and state["average"] is not None:
            raw = state["raw"] if state["raw"] is not None else _network(trainer).state_dict()
            torch.save({"raw": raw, "updates": state["average"].updates}, filename + RAW_SUFFIX)

    def load_checkpoint(filename: str) -> None:
        originals["load_checkpoint"](filename)  # the network now holds what was saved: the average
        sidecar = Path(str(filename) + RAW_SUFFIX)
        if not sidecar.is_file() or Path(filename).name == FINAL_CHECKPOINT:  # a finished training keeps the average
            return
        saved = torch.load(sidecar, map_location="cpu", weights_only=True)
        state["average"] = WeightAverage(_network(trainer), decay)
        state["average"].updates = int(saved["updates"])
        _network(trainer).load_state_dict(saved["raw"])
        state["raw"] = None

    # Instance attributes: only this trainer is affected.
    trainer.train_step, trainer.on_validation_epoch_start = train_step, on_validation_epoch_start
    trainer.on_epoch_end, trainer.on_train_end = on_epoch_end, on_train_end
    trainer.save_checkpoint, trainer.load_checkpoint = save_checkpoint, load_checkpoint
