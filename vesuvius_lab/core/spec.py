"""Typed models of ``vesuvius.toml`` (project defaults) and of an experiment file.

Unknown keys are forbidden at every level, so a typo is an error rather than a silently ignored
setting. A plugin's ``params`` table is a plain dict here; the plugin's own ``Params`` model
validates it once the name is resolved (see :mod:`vesuvius_lab.core.experiment`).
Fields left ``None`` are filled from the project settings when the spec is resolved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

Shape3 = tuple[int, int, int]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ProjectSettings(Strict):
    """``vesuvius.toml``: defaults shared by every experiment of a project."""

    data_root: Path = Field(Path("data/synthetic"), description="Competition-layout data folder.")
    runs_dir: Path = Field(Path("runs"), description="Where runs are recorded.")
    cache_dir: Path | None = Field(None, description="Decoded-volume cache; default <runs_dir>/.cache.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    seed: int = Field(0, description="Default random seed.")
    workers: int = Field(2, ge=0, description="DataLoader workers per process.")
    folds: int = Field(5, ge=2, description="Number of cross-validation folds.")


class PluginRef(Strict):
    """A named plugin and its params (validated by the plugin's own Params model)."""

    plugin: str = Field(description="Entry-point name of the plugin.")
    params: dict[str, Any] = Field(default_factory=dict, description="The plugin's parameters.")


class LossTerm(PluginRef):
    weight: float = Field(1.0, ge=0, description="Weight of this term in the summed loss.")


class Augment(Strict):
    flips: bool = Field(True, description="Random flips along each axis.")
    rot90: bool = Field(True, description="Random 90-degree rotations in the (H, W) plane.")
    intensity: bool = Field(True, description="Random intensity scale and shift.")
    noise: bool = Field(True, description="Additive Gaussian noise.")


class DataSpec(Strict):
    root: Path | None = Field(None, description="Data folder; default the project's data_root.")
    folds: int | None = Field(None, ge=2, description="Number of folds; default the project's.")
    fold: int = Field(0, ge=0, description="The validation fold of this run.")
    group_by: Literal["scroll_id", "id"] = Field("scroll_id", description="Folds never split a group.")
    window: Shape3 = Field((16, 128, 128), description="Training patch shape (D, H, W).")
    foreground_oversample: float = Field(0.33, ge=0, le=1, description="Share of patches centred on surface.")
    augment: Augment = Field(default_factory=Augment)
    ignore_label: int | None = Field(2, description="Label value excluded from losses and the metric.")

    @field_validator("window")
    @classmethod
    def _positive(cls, window: Shape3) -> Shape3:
        if min(window) < 1:
            raise ValueError("every side of the window must be at least 1")
        return window


class TrainSpec(Strict):
    epochs: int = Field(50, ge=1)
    iterations_per_epoch: int = Field(250, ge=1)
    batch_size: int = Field(2, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD momentum (Nesterov).")
    scheduler: Literal["poly", "cosine", "constant"] = "poly"
    warmup_epochs: int = Field(0, ge=0)
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="auto: bf16/fp16 on CUDA, off on CPU.")
    grad_accum: int = Field(1, ge=1, description="Batches accumulated per optimizer step.")
    grad_clip: float | None = Field(12.0, gt=0, description="Max gradient norm; None disables clipping.")
    nproc: int = Field(1, ge=1, description="DDP processes on this machine.")
    seed: int | None = Field(None, description="Default: the project's seed.")
    workers: int | None = Field(None, ge=0, description="DataLoader workers; default the project's.")
    validate_every: int = Field(1, ge=1, description="Validate every N epochs (and after the last).")


TTA = Literal["flip0", "flip1", "flip2", "rot90"]


class InferenceSpec(Strict):
    window: Shape3 | None = Field(None, description="Sliding-window shape; default data.window.")
    overlap: Union[float, tuple[float, float, float]] = Field(0.5, description="Fraction in [0, 1), per axis or one for all.")
    blend: PluginRef = Field(default_factory=lambda: PluginRef(plugin="gaussian"))
    batch_size: int = Field(4, ge=1)
    tta: list[TTA] = Field(default_factory=list, description="Flips along axes and in-plane rot90.")
    axes: list[Literal[0, 1, 2]] = Field(default_factory=lambda: [0], min_length=1,
                                         description="Axes used as depth in turn, averaged (2.5D models).")
    threshold: float = Field(0.5, gt=0, lt=1, description="Probability above which a voxel is surface.")

    @field_validator("overlap")
    @classmethod
    def _overlap_range(cls, overlap):
        values = overlap if isinstance(overlap, tuple) else (overlap,)
        if any(not 0 <= v < 1 for v in values):
            raise ValueError("overlap must be in [0, 1)")
        return overlap


def _default_losses() -> list[LossTerm]:
    return [LossTerm(plugin="dice", weight=0.5), LossTerm(plugin="bce", weight=0.5)]


class Experiment(Strict):
    """One experiment file (after ``extends`` are merged)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100,
                      description="Run folder name: letters, digits, '.', '_' and '-'.")
    description: str = ""
    extends: Union[str, list[str], None] = Field(None, description="Parent file(s), relative to this file.")
    data: DataSpec = Field(default_factory=DataSpec)
    model: PluginRef
    loss: list[LossTerm] = Field(default_factory=_default_losses, min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    postprocess: list[PluginRef] = Field(default_factory=list)

    @property
    def inference_window(self) -> Shape3:
        return self.inference.window or self.data.window
