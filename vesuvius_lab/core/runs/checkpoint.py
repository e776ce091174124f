"""Checkpoints: written atomically, loaded safely (``weights_only=True``), checked against the model.

torch is imported where it is used, so that opening runs (``core/inference``) stays cheap to import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vesuvius_lab.core.errors import UserError, brief
from vesuvius_lab.core.files import atomic_path

if TYPE_CHECKING:
    import torch


def save(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint; a process killed mid-write leaves the previous file intact."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path, map_location: str = "cpu") -> dict[str, Any]:
    """Read a checkpoint without executing code from it; a damaged or foreign file is a user error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found. Was the run trained to the end of an epoch? "
                        "`vlab leaderboard --runs` shows each run's state.")
    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable vesuvius-lab checkpoint ({type(exc).__name__}: "
                        f"{brief(exc)}). Use checkpoints/last.pt or best.pt of a run.") from None
    if not isinstance(state, dict) or "model" not in state or "model_plugin" not in state:
        raise UserError(f"{path}: this file is not a vesuvius-lab checkpoint (no model state). "
                        "Use checkpoints/last.pt or best.pt of a run.")
    return state


def load_model_state(module: "torch.nn.Module", state: dict[str, Any], path: Path, plugin: str, params: dict) -> None:
    """Load weights, refusing a checkpoint of another model with a message instead of a shape error."""
    if state["model_plugin"] != plugin or state.get("model_params") != params:
        raise UserError(f"{path}: this checkpoint is from model {state['model_plugin']} "
                        f"{state.get('model_params')}, but the experiment builds {plugin} {params}. "
                        "Use the run that trained this model, or the matching experiment file.")
    try:
        module.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"{path}: the weights do not fit the model ({brief(exc)}). "
                        "Use the checkpoint of a run of this experiment.") from None
