"""The hole-stitching UNet: a small 3D network that closes holes in predicted papyrus sheets.

A segmentation model often leaves holes where a sheet is faint. This network learns, from
labels alone, to turn a damaged sheet mask back into the labelled sheet: training inputs are
labels corrupted by :func:`punch_holes` (random holes, optional erosion and dust), targets are
the labels themselves.

The reusable parts (the corruption, ``punch_holes``, and the merge of stitched voxels into the
input, ``merge_stitched``, live in ``core/corruption.py`` and ``core/stitch_merge.py``):
  :func:`build_stitcher_network`  a MONAI ``UNet`` with few features, 1 or 2 input channels
                                  (mask, or mask and probabilities), 1 output channel (logits)
  :func:`stitcher_loss`           L1 (or BCE) reconstruction plus a gradient-matching term, both
                                  masked by the ignore label
  :class:`StitcherWindows`        random damaged training windows and their targets
  :func:`fit_hole_stitcher`       a standalone training loop that returns (and can save) weights
  :func:`save_stitcher` / :func:`load_stitcher`   checkpoint files
  ``hole_stitching_unet``         the postprocessors plugin applying a trained stitcher

Checkpoints are ``torch.save`` dicts read with ``weights_only=True``: either this module's
``{"state_dict", "params", "window"}`` or a run's ``checkpoints/best.pt`` whose ``"model"`` and
``"model_params"`` hold the same network.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vesuvius_lab.core.data.corruption import CorruptionParams, punch_holes
from vesuvius_lab.core.errors import UserError, brief
from vesuvius_lab.core.inference.postprocess import is_probabilities, to_mask
from vesuvius_lab.core.inference.stitch_merge import MergeRule, merge_stitched
from vesuvius_lab.core.registry import plugin

if TYPE_CHECKING:
    import torch

Shape3 = tuple[int, int, int]
DEFAULT_WINDOW: Shape3 = (64, 64, 64)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- network and loss


class StitcherNetParams(_Params):
    """The network: a MONAI UNet with ``len(channels) - 1`` stride-2 levels."""

    in_channels: Literal[1, 2] = Field(1, description="1: the mask; 2: the mask and the surface probabilities.")
    channels: tuple[int, ...] = Field((8, 16, 32), description="Features per level, coarsest last.")
    num_res_units: int = Field(0, ge=0, le=4, description="Residual units per level.")
    identity_gain: float = Field(2.0, ge=0, description="Logits of the input mask added to the output (2*mask-1 "
                                                        "times this), so that copying the input is free and the "
                                                        "network learns only the corrections; 0 disables.")

    @field_validator("channels")
    @classmethod
    def _levels(cls, channels: tuple[int, ...]) -> tuple[int, ...]:
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError("channels needs at least two positive feature counts")
        return channels

    @property
    def window_multiple(self) -> int:
        """Every window side must be a multiple of this (one halving per level)."""
        return 2 ** (len(self.channels) - 1)


def build_stitcher_network(params: StitcherNetParams) -> "torch.nn.Module":
    """(B, in_channels, D, H, W) float, channel 0 the mask -> (B, 1, D, H, W) logits; sides multiples of
    ``window_multiple``."""
    import torch
    from monai.networks.nets import UNet

    class Stitcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = UNet(spatial_dims=3, in_channels=params.in_channels, out_channels=1,
                             channels=params.channels, strides=(2,) * (len(params.channels) - 1),
                             num_res_units=params.num_res_units)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.unet(x) + params.identity_gain * (2 * x[:, :1] - 1)

    return Stitcher()


def stitcher_loss(logits: "torch.Tensor", target: "torch.Tensor", valid: "torch.Tensor", *,
                  gradient_weight: float = 0.1, reconstruction: Literal["l1", "bce"] = "l1") -> "torch.Tensor":
    """Mean L1 between sigmoid(logits) and the target (``reconstruction="bce"``: binary cross-entropy of the
    logits instead), plus ``gradient_weight`` times the mean L1 between their finite differences along
    each axis (penalises ragged edges and leftover holes).

    ``valid``: bool, False at the ignore label; or float per-voxel weights, 0 at the ignore label.
    """
    import torch

    prob = torch.sigmoid(logits.float())
    target = target.float()
    valid = valid.float()
    if reconstruction == "bce":
        per_voxel = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    elif reconstruction == "l1":
        per_voxel = (prob - target).abs()
    else:
        raise ValueError(f"reconstruction must be 'l1' or 'bce', not {reconstruction!r}")
    loss = (per_voxel * valid).sum() / valid.sum().clamp_min(1.0)
    if gradient_weight:
        terms = []
        for dim in (2, 3, 4):
            # A difference counts only where both of its voxels are valid.
            pair = valid.narrow(dim, 1, valid.shape[dim] - 1) * valid.narrow(dim, 0, valid.shape[dim] - 1)
            diff = (prob.diff(dim=dim) - target.diff(dim=dim)).abs()
            terms.append((diff * pair).sum() / pair.sum().clamp_min(1.0))
        loss = loss + gradient_weight * torch.stack(terms).mean()
    return loss


# --------------------------------------------------------------------------- inputs


def pack_inputs(mask: np.ndarray, probabilities: np.ndarray | None) -> np.ndarray:
    """One float32 volume carrying both inputs, 2 * mask + probability, for the one-channel window engine.

    Values in [0, 1] mean mask 0, values in [2, 3] mean mask 1, so :func:`unpack_inputs` is exact;
    zero padding unpacks to mask 0, probability 0.
    """
    packed = 2 * (mask != 0).astype(np.float32)
    if probabilities is not None:
        packed += probabilities.astype(np.float32)
    return packed


def unpack_inputs(packed: "torch.Tensor", in_channels: int) -> "torch.Tensor":
    """(B, 1, ...) packed windows -> (B, in_channels, ...): the mask, then the probabilities."""
    import torch

    mask = (packed >= 1.5).float()
    if in_channels == 1:
        return mask
    return torch.cat([mask, packed - 2 * mask], dim=1)


# --------------------------------------------------------------------------- training


def _pad_to(volume: np.ndarray, window: Shape3, value: float) -> np.ndarray:
    pads = [(0, max(w - n, 0)) for w, n in zip(window, volume.shape)]
    return np.pad(volume, pads, constant_values=value) if any(p[1] for p in pads) else volume


def _augment(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flips (and, for cubic windows, axis order) for every array: sheets run any way."""
    axes = tuple(rng.permutation(3)) if len(set(arrays[0].shape)) == 1 else (0, 1, 2)
    flips = [axis for axis in range(3) if rng.random() < 0.5]
    return [np.ascontiguousarray(np.flip(a.transpose(axes), flips)) for a in arrays]


class StitcherWindows:
    """Random training windows of label volumes, damaged by :func:`punch_holes`, with their targets.

    ``labels``: volumes of 0 (background), 1 (surface) and ``ignore_label``; volumes smaller than
    the window are padded with the ignore label. ``probabilities`` (one float volume per label)
    give the second input channel of a 2-channel stitcher.
    """

    def __init__(self, labels: list[np.ndarray], window: Sequence[int], *, ignore_label: int | None = 2,
                 probabilities: list[np.ndarray] | None = None, surface_share: float = 0.9):
        self.window: Shape3 = tuple(int(s) for s in window)
        pad = ignore_label if ignore_label is not None else 0
        self.labels = [_pad_to(np.asarray(label), self.window, pad) for label in labels]
        self.probabilities = None if probabilities is None else [
            _pad_to(np.asarray(p, dtype=np.float32), self.window, 0) for p in probabilities]
        self.ignore_label = ignore_label
        self.surface_share = surface_share
        self.surfaces = [np.flatnonzero(label == 1) for label in self.labels]

    def _corner(self, index: int, rng: np.random.Generator) -> list[int]:
        """Centred on a random surface voxel (``surface_share`` of the time, when there is one), else uniform."""
        shape, surface = self.labels[index].shape, self.surfaces[index]
        if surface.size and rng.random() < self.surface_share:
            centre = np.unravel_index(surface[rng.integers(surface.size)], shape)
            return [int(np.clip(c - w // 2, 0, n - w)) for c, w, n in zip(centre, self.window, shape)]
        return [int(rng.integers(n - w + 1)) for w, n in zip(self.window, shape)]

    def sample(self, rng: np.random.Generator, corruption: CorruptionParams,
               in_channels: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One window: (inputs (C, *window) float32, target (1, ...) float32, valid (1, ...) bool)."""
        index = int(rng.integers(len(self.labels)))
        where = tuple(slice(c, c + w) for c, w in zip(self._corner(index, rng), self.window))
        arrays = [self.labels[index][where]]
        if in_channels == 2:
            arrays.append(self.probabilities[index][where])
        arrays = _augment(arrays, rng)
        patch = arrays[0]
        corrupted = punch_holes(patch, rng, **corruption.model_dump())
        channels = [corrupted.astype(np.float32)]
        if in_channels == 2:
            # Where a hole was punched, the segmentation model's confidence is taken to be low too.
            prob = arrays[1].astype(np.float32)
            prob[(patch == 1) & (corrupted == 0)] *= rng.uniform(0.0, 0.5)
            channels.append(prob)
        valid = patch != self.ignore_label if self.ignore_label is not None else np.ones(patch.shape, bool)
        return np.stack(channels), (patch == 1)[None].astype(np.float32), valid[None]

    def batch(self, batch_size: int, rng: np.random.Generator, corruption: CorruptionParams,
              in_channels: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``batch_size`` windows stacked: inputs (B, C, ...), target (B, 1, ...), valid (B, 1, ...)."""
        samples = [self.sample(rng, corruption, in_channels) for _ in range(batch_size)]
        return tuple(np.stack(parts) for parts in zip(*samples))  # type: ignore[return-value]


def fit_hole_stitcher(labels: list[np.ndarray], *, window: Sequence[int] = (32, 32, 32), iterations: int = 500,
                      batch_size: int = 4, lr: float = 5e-3, network: StitcherNetParams | None = None,
                      corruption: CorruptionParams | None = None, probabilities: list[np.ndarray] | None = None,
                      gradient_weight: float = 0.1, damage_weight: float = 3.0,
                      ignore_label: int | None = 2, seed: int = 0,
                      device: str = "cpu", checkpoint: Path | None = None, progress: bool = True) -> dict:
    """Train a stitcher on label volumes (values 0, 1, ignore) and return its state_dict.

    Each iteration draws ``batch_size`` windows (90% centred on surface), damages them with
    :func:`punch_holes` and fits the network to restore the label. With
    ``network.in_channels == 2``, ``probabilities`` (one float volume per label, e.g. a model's
    out-of-fold predictions) give the second channel. ``damage_weight``: extra loss weight of the
    voxels the corruption changed (1 + damage_weight times). ``checkpoint``: where to save the result
    (see :func:`save_stitcher`).
    """
    import torch

    network = network or StitcherNetParams()
    corruption = corruption or CorruptionParams()
    window = tuple(int(s) for s in window)
    _check_window(window, network)
    if not labels or iterations < 1 or batch_size < 1:
        raise ValueError("fit_hole_stitcher needs label volumes, iterations >= 1 and batch_size >= 1")
    if network.in_channels == 2 and (probabilities is None or len(probabilities) != len(labels)):
        raise ValueError("a 2-channel stitcher needs one probability volume per label volume")
    windows = StitcherWindows(labels, window, ignore_label=ignore_label, probabilities=probabilities)

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = build_stitcher_network(network).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=iterations, pct_start=0.1)
    for _ in _track(range(iterations), "training the hole stitcher", progress):
        inputs, target, valid = (torch.from_numpy(a).to(device) for a in
                                 windows.batch(batch_size, rng, corruption, network.in_channels))
        weights = valid.float()
        if damage_weight:
            # Damaged voxels are few; without extra weight copying the input is nearly optimal.
            weights = weights * (1 + damage_weight * (inputs[:, :1] != target).float())
        loss = stitcher_loss(model(inputs), target, weights, gradient_weight=gradient_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if checkpoint is not None:
        save_stitcher(checkpoint, state, network, window)
    return state


def _track(items, label: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=label, transient=True)


def _check_window(window: Sequence[int], network: StitcherNetParams) -> None:
    problem = stitcher_window_problem(window, network)
    if problem:
        raise UserError(f"The hole stitcher's window {tuple(window)} {problem}")


def stitcher_window_problem(window: Sequence[int], network: StitcherNetParams) -> str | None:
    """What is wrong with ``window`` for ``network`` (a sentence following "the window ..."), or None."""
    multiple = network.window_multiple
    if len(window) != 3 or any(side < multiple or side % multiple for side in window):
        return (f"does not fit its network: with {len(network.channels)} levels every side must be a multiple "
                f"of {multiple}. Choose e.g. {tuple(max(multiple, s // multiple * multiple) for s in window)}.")
    if all(side == multiple for side in window):
        return (f"shrinks to a single voxel at the bottom of its {len(network.channels)}-level UNet, where its "
                f"instance norm fails. Make one side {2 * multiple} or more.")
    return None


# --------------------------------------------------------------------------- checkpoints


def save_stitcher(path: Path, state_dict: dict, network: StitcherNetParams, window: Sequence[int]) -> None:
    """Write ``{"state_dict", "params", "window"}`` atomically with ``torch.save``."""
    import torch

    from vesuvius_lab.core.files import atomic_path

    with atomic_path(Path(path)) as tmp:
        torch.save({"state_dict": state_dict, "params": network.model_dump(mode="json"),
                    "window": [int(s) for s in window]}, tmp)


def load_stitcher(path: Path, device: Any = "cpu") -> tuple["torch.nn.Module", StitcherNetParams, Shape3 | None]:
    """(network in eval mode, its params, its training window or None) from a stitcher or run checkpoint."""
    weights, network, window = read_stitcher_checkpoint(path)
    try:
        model = build_stitcher_network(network)
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"{path}: these weights are not a hole-stitcher network "
                        f"({brief(exc)}). Point the plugin at a stitcher's checkpoint.") from None
    return model.to(device).eval(), network, window


def read_stitcher_checkpoint(path: Path) -> tuple[dict, StitcherNetParams, Shape3 | None]:
    """(state dict, network params, training window or None) of a stitcher or run checkpoint; builds nothing."""
    import torch
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: hole-stitcher checkpoint not found. Give the file written by "
                        "fit_hole_stitcher, or a run whose checkpoints/best.pt exists.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot read this checkpoint ({type(exc).__name__}: "
                        f"{brief(exc)}). Train the stitcher again.") from None
    if isinstance(state, dict) and "state_dict" in state:
        weights, params, window = state["state_dict"], state.get("params", {}), state.get("window")
    elif isinstance(state, dict) and "model" in state:
        weights, params, window = state["model"], state.get("model_params", {}), None
    else:
        raise UserError(f"{path}: not a hole-stitcher checkpoint (it has neither 'state_dict' nor 'model').")
    try:
        network = StitcherNetParams.model_validate(params)
    except ValidationError as exc:
        raise UserError(f"{path}: these weights are not a hole-stitcher network "
                        f"({brief(exc)}). Point the plugin at a stitcher's checkpoint.") from None
    try:
        window = tuple(int(s) for s in window) if window else None
    except (TypeError, ValueError):  # a damaged record: the default window is used
        window = None
    return weights, network, window


# --------------------------------------------------------------------------- the plugin


class HoleStitchingParams(_Params):
    checkpoint: Path | None = Field(None, description="A stitcher checkpoint file (relative to the working directory).")
    run: str | None = Field(None, description="A run folder, or an experiment name (its newest finished run), "
                                              "relative to the runs dir; uses its checkpoints/best.pt.")
    window: Shape3 | None = Field(None, description="Sliding window; default the training window, else 64^3.")
    overlap: float = Field(0.5, ge=0, lt=1, description="Window overlap fraction.")
    batch_size: int = Field(4, ge=1, description="Windows per forward pass.")
    merge: MergeRule = Field(
        "topology", description="How stitched voxels join the input mask (core/stitch_merge.py). topology: keep "
                                "each added group that closes a tunnel in one sheet and joins nothing; near: "
                                "added voxels within max_distance of the input; union: all; replace: the "
                                "stitched mask alone.")
    max_distance: int = Field(8, ge=1, description="near: how far (6-connected steps) from the input a voxel may be added.")

    @field_validator("window")
    @classmethod
    def _positive_window(cls, window: Shape3 | None) -> Shape3 | None:
        if window is not None and min(window) < 1:
            raise ValueError(f"every side of the window must be at least 1, got {list(window)}")
        return window

    @model_validator(mode="after")
    def _one_source(self) -> "HoleStitchingParams":
        if (self.checkpoint is None) == (self.run is None):
            raise ValueError("give exactly one of checkpoint (a file) or run (a run folder)")
        if "max_distance" in self.model_fields_set and self.merge != "near":
            raise ValueError(f'max_distance applies only to merge = "near" (merge is "{self.merge}"); '
                             'remove max_distance or set merge = "near"')
        return self


def _checkpoint_path(params: HoleStitchingParams, runs_dir: Path | None) -> Path:
    if params.checkpoint is not None:
        return params.checkpoint
    from vesuvius_lab.core.runs.records import resolve_run

    return resolve_run(params.run, Path(runs_dir or "runs")).checkpoints / "best.pt"


def _device(device: Any) -> str:
    if str(device) != "auto":
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_hole_stitching(params: HoleStitchingParams, spec: Any):
    """The checkpoint file (or the run, when it exists already) must hold a hole stitcher whose network
    takes the window. A ``run`` that does not exist yet passes: an earlier experiment of the same
    ``vlab run`` may train it, and ``vlab train`` refuses a missing one before it starts."""
    source = "checkpoint" if params.checkpoint is not None else "run"
    if params.checkpoint is not None:
        if not params.checkpoint.is_file():
            yield "checkpoint", (f'no file "{params.checkpoint}" (relative paths are relative to the working '
                                 "directory). Give the file fit_hole_stitcher wrote, or use run = an experiment "
                                 "name or run folder.")
            return
        try:
            _, network, trained_window = read_stitcher_checkpoint(params.checkpoint)
        except UserError as exc:
            yield "checkpoint", str(exc)
            return
    else:
        found = _existing_run_network(params.run)
        if found is None:
            return
        network, problem = found
        if problem:
            yield "run", problem
            return
        trained_window = None
    window = params.window or trained_window or DEFAULT_WINDOW
    problem = stitcher_window_problem(window, network)
    if problem:
        where = f"window = {list(window)}" if params.window else f"the default window {list(window)} (set window)"
        yield ("window" if params.window else source), f"{where} {problem}"


def _existing_run_network(run: str) -> tuple[StitcherNetParams | None, str | None] | None:
    """(network, None) or (None, problem) for a run that resolves now; None when there is none (yet)."""
    from pydantic import ValidationError

    from vesuvius_lab.core.config.project import load_project
    from vesuvius_lab.core.runs.records import resolve_run

    try:
        found = resolve_run(run, load_project().runs_dir)
    except (UserError, OSError):
        return None
    record = found.read("spec.json") or {}
    if "model" not in record:
        return None  # an old or partial record: its checkpoint says what it holds, and the build reports it
    model = record["model"] if isinstance(record["model"], dict) else {}
    if model.get("plugin") != "hole_stitcher_unet":
        what = f'model "{model["plugin"]}"' if model.get("plugin") else "an ensemble"
        return None, (f'"{run}" is a run of {what}, not of hole_stitcher_unet ({found.path}). Name a run of a '
                      'hole-stitcher experiment ([model] plugin = "hole_stitcher_unet").')
    if not (found.checkpoints / "best.pt").is_file():
        return None, (f'the run "{run}" ({found.path}) has no checkpoints/best.pt yet. Let it finish, or name '
                      "another run.")
    try:
        return StitcherNetParams.model_validate(model.get("params") or {}), None
    except ValidationError:
        return None  # its checkpoint says what it holds; the build reports it


@plugin(HoleStitchingParams, check=check_hole_stitching)
def hole_stitching_unet(params: HoleStitchingParams, *, device: Any = "cpu", runs_dir: Path | None = None,
                        threshold: float = 0.5, **context):
    """Close holes in sheets with a trained 3D UNet applied in Gaussian-blended sliding windows."""
    import torch

    from vesuvius_lab.core.inference.engine import sliding_window

    device = _device(device)
    model, network, trained_window = load_stitcher(_checkpoint_path(params, runs_dir), device)
    window = params.window or trained_window or DEFAULT_WINDOW
    _check_window(window, network)

    def predict(windows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(unpack_inputs(windows, network.in_channels)))

    def step(volume: np.ndarray) -> np.ndarray:
        mask = to_mask(volume, threshold)
        if not mask.any():
            return mask
        probabilities = None
        if network.in_channels == 2:
            probabilities = volume if is_probabilities(volume) else mask
        stitched = sliding_window(pack_inputs(mask, probabilities), predict, window=window, overlap=params.overlap,
                                  blender="gaussian", batch_size=params.batch_size, device=device)[0] > 0.5
        return merge_stitched(mask, stitched, params.merge, params.max_distance)

    return step


# --------------------------------------------------------------------------- trained by `vlab train`


def _check_stitcher_windows(params: StitcherNetParams, spec: Any):
    """Windows must be multiples of the network's downsampling; the core feeds one channel (the mask)."""
    from vesuvius_lab.core.contract.windows import spec_windows, window_problems

    multiple = params.window_multiple
    for message in window_problems(spec_windows(spec), (multiple,) * 3, network=f"a UNet of {len(params.channels)} levels"):
        yield "", message
    for key, window in spec_windows(spec).items():
        if all(side == multiple for side in window):
            yield "channels", (f"{key} = {list(window)} shrinks to a single voxel at the bottom of this "
                               f"{len(params.channels)}-level UNet, where its instance norm fails. Make one side "
                               f"{2 * multiple} or more, or use one level fewer.")
    if params.in_channels != 1:
        yield "in_channels", "vlab train feeds the stitcher the damaged mask alone: use in_channels = 1."
    if spec.data.task != "hole_stitching":
        yield "", 'the stitcher learns to repair labels: set [data] task = "hole_stitching".'


@plugin(StitcherNetParams, check=_check_stitcher_windows)
def hole_stitcher_unet(params: StitcherNetParams, **context):
    """Small 3D UNet that repairs holes in sheet masks (train with [data] task = "hole_stitching")."""
    return build_stitcher_network(params)


class StitchLossParams(_Params):
    reconstruction: Literal["l1", "bce"] = Field("l1", description="l1: mean absolute error of the probabilities; "
                                                                   "bce: binary cross-entropy of the logits.")
    gradient_weight: float = Field(0.1, ge=0, description="Weight of the finite-difference (smoothness) term.")
    damage_weight: float = Field(3.0, ge=0, description="Voxels where the input differs from the label (the "
                                                         "punched holes) count 1 + this; without it the network "
                                                         "learns to copy its input.")


def check_stitch_loss(params: StitchLossParams, spec: Any):
    """damage_weight compares the network's input mask with the label: only the hole-stitching task has one."""
    if params.damage_weight and spec.data.task != "hole_stitching":
        yield "damage_weight", (f'[data] task = "{spec.data.task}": damage_weight weights the voxels where the '
                                "network's input differs from the label, which means something only when the "
                                'input is a damaged label (task = "hole_stitching"). Set damage_weight = 0 or '
                                'task = "hole_stitching".')


@plugin(StitchLossParams, check=check_stitch_loss)
def stitch(params: StitchLossParams, **context):
    """L1 reconstruction plus a gradient-matching term (the hole stitcher's loss), ignore-masked."""

    def loss(logits, target, valid, inputs=None):
        weights = valid.float()
        if inputs is not None and params.damage_weight:
            damaged = (inputs[:, :1] > 0.5) != (target > 0.5)
            weights = weights * (1 + params.damage_weight * damaged.float())
        return stitcher_loss(logits, target, weights, gradient_weight=params.gradient_weight,
                             reconstruction=params.reconstruction)

    return loss
