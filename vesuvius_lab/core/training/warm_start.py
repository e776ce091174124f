"""``[train] init``: start a training from weights trained before, e.g. fine-tuning at a larger window.

The source is a run directory (its best checkpoint: the weight average when the run kept one),
``<experiment>/<run-id>`` under the runs folder, or a checkpoint file (a vesuvius-lab checkpoint
or a plain ``state_dict``). Convolutional networks do not depend on the window, so a run trained
at 128^3 can start one at 192^3; every layer must match by name and shape, and a mismatch is
refused before the run folder is created, listing the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vesuvius_lab.core.errors import UserError, brief
from vesuvius_lab.core.runs.folder import Run

SHOWN = 8  # layers named per kind of mismatch; the rest are counted


@dataclass(frozen=True)
class InitSource:
    given: str  # as the experiment wrote it
    path: Path  # the run directory or checkpoint file it names
    run: Run | None  # the run, when it names one

    @property
    def checkpoint(self) -> Path:
        return self.run.checkpoints / "best.pt" if self.run is not None else self.path


def resolve_init(text: str, runs_dir: Path) -> InitSource:
    """The run or checkpoint file ``text`` names (a path, or relative to ``runs_dir``), or a clear error."""
    for candidate in (Path(text).expanduser(), Path(runs_dir) / text):
        if (candidate / "spec.json").is_file():
            run = Run(candidate.resolve())  # a self-training backend's run keeps its weights its own way
            return InitSource(text, run.path, run)
        if candidate.is_file():
            return InitSource(text, candidate.resolve(), None)
    raise UserError(f'train.init = "{text}": neither a run directory (with spec.json) nor a checkpoint file, as a '
                    f"path or under {runs_dir}. Give runs/<experiment>/<run-id>, <experiment>/<run-id> or a .pt file; "
                    "`vlab leaderboard --runs` lists the runs.")


def initial_state(source: InitSource) -> dict:
    """The state dict to start from: a checkpoint's model weights, or a plain state dict."""
    import torch

    path = source.checkpoint
    if source.run is not None and not path.is_file():
        raise UserError(f'train.init = "{source.given}": the run {source.run.path} has no checkpoints/best.pt: it is an '
                        "ensemble or tuning run, a run of a backend that trains itself (its weights fit that backend "
                        "only), or it did not finish an epoch. Give a trained model's run or checkpoint file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f'train.init = "{source.given}": {path} cannot be read as a checkpoint ({type(exc).__name__}: '
                        f"{brief(exc)}). Give a run directory or a .pt file written by torch.save.") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'train.init = "{source.given}": {path} holds no model weights (neither a vesuvius-lab '
                        "checkpoint nor a state_dict of tensors).")
    return state


def load_initial_weights(model, source: InitSource) -> str:
    """Load the source's weights into ``model`` (all layers must match); returns a line for the log."""
    state = initial_state(source)
    own = model.state_dict()
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    reshaped = [f"{name} ({tuple(state[name].shape)} there, {tuple(own[name].shape)} here)"
                for name in own if name in state and state[name].shape != own[name].shape]
    if missing or unexpected or reshaped:
        parts = [f"{label} {len(names)}: {', '.join(names[:SHOWN])}{', ...' if len(names) > SHOWN else ''}"
                 for label, names in (("layers missing from it", missing), ("layers this model lacks", unexpected),
                                      ("layers of another shape", reshaped)) if names]
        raise UserError(f'train.init = "{source.given}": the weights in {source.checkpoint} do not fit this '
                        f"model; {'; '.join(parts)}. Start from a run of the same model and params, or remove "
                        "train.init. The window may differ only where the network does not depend on it: a 2.5D "
                        "model reads the window's depth as input channels, so keep data.window's first side.")
    model.load_state_dict(state)
    return f"initial weights from {source.checkpoint} ({len(state)} tensors)"
