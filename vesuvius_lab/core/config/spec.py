"""Typed models of ``vesuvius.toml`` (project defaults) and of an experiment file.

Unknown keys are forbidden at every level, so a typo is an error rather than a silently ignored
setting. A plugin's ``params`` table is a plain dict here; the plugin's own ``Params`` model
validates it once the name is resolved (see :mod:`vesuvius_lab.core.config.experiment`).
Fields left ``None`` are filled from the project settings when the spec is resolved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo,
                      field_validator, model_validator)

Shape3 = tuple[int, int, int]


class CorruptionParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    """How training inputs are damaged (the arguments of :func:`vesuvius_lab.core.data.corruption.punch_holes`)."""

    holes: tuple[int, int] = Field((2, 5), description="Holes per 32^3 voxels (inclusive range).")
    radius: tuple[int, int] = Field((2, 5), description="Hole radius in voxels (inclusive range).")
    erode_probability: float = Field(0.0, ge=0, le=1, description="Chance of thinning the sheets by one voxel.")
    dust: tuple[int, int] = Field((0, 0), description="False-positive blobs per 32^3 voxels (inclusive range).")
    dust_radius: int = Field(1, ge=0, description="Radius of a dust blob.")

    @field_validator("holes", "radius", "dust")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError("a range must be (low, high) with 0 <= low <= high")
        return value


_RANGE_KEYS = {"low", "high", "log", "step", "choices"}


def _is_range(table: dict) -> bool:
    """A range's keys are among low/high/log/step/choices and none holds a table (``params.low`` does)."""
    return bool(table) and set(table) <= _RANGE_KEYS and not any(isinstance(v, dict) for v in table.values())


def _flatten_ranges(table: dict, prefix: str = "") -> dict:
    """``a.b = {low = 1, high = 2}`` (TOML reads it as nested tables) -> ``{"a.b": {...}}``."""
    flat = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_range(value):
            flat.update(_flatten_ranges(value, path + "."))
        else:
            flat[path] = value
    return flat


class Strict(BaseModel):
    # inf and nan (TOML has both) are no setting's value: refused, not left to diverge a run later.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


#: A SLURM time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
#: An extra sbatch line: ``--name``, ``--name=value`` or ``--name value``, optionally after ``#SBATCH``.
SBATCH_OPTION = re.compile(r"^(?:#SBATCH\s+)?--([A-Za-z][\w-]*)(?:(?:=|\s+)(\S.*))?$")


class LauncherSettings(Strict):
    """``[launcher]``: how ``vlab run --launcher slurm`` submits each job through submitit."""

    partition: str | None = Field(None, description="SLURM partition (sbatch --partition); default the cluster's.")
    time: str = Field("24:00:00", description='Time limit of each job: minutes ("90"), "HH:MM:SS" or "D-HH:MM:SS".')
    nodes: int = Field(1, ge=1, description="Nodes per job; more than 1 starts torchrun on each (multi-node DDP).")
    gpus_per_node: int = Field(1, ge=0, description="GPUs per node; 0 for CPU-only jobs.")
    cpus_per_task: int | None = Field(None, ge=1, description="CPU cores per task; default the cluster's.")
    mem_gb: float | None = Field(None, gt=0, description="Memory per node in GB; default the cluster's.")
    sbatch: list[str] = Field(default_factory=list, description='Extra sbatch lines, e.g. ["--qos=high", '
                              '"--account=vesuvius"] ("#SBATCH " in front is allowed).')
    setup: list[str] = Field(default_factory=list, description="Shell lines run before each job, e.g. "
                             '["module load cuda", "source .venv/bin/activate"].')
    folder: Path | None = Field(None, description="submitit's job files and logs; default <runs_dir>/.submitit.")
    port: int = Field(29500, ge=1024, le=65535, description="Rendezvous port of multi-node torchrun jobs.")

    @field_validator("time")
    @classmethod
    def _time_limit(cls, value: str) -> str:
        if not SLURM_TIME.match(value.strip()):
            raise ValueError(f'{value!r} is not a SLURM time limit: write minutes ("90"), "HH:MM:SS" or "D-HH:MM:SS"')
        return value.strip()

    @field_validator("sbatch")
    @classmethod
    def _sbatch_lines(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if not SBATCH_OPTION.match(line.strip()):
                raise ValueError(f'{line!r} is not an sbatch option: write "--name=value" or "--flag"')
        return [line.strip() for line in lines]


def _workers(value: int | str) -> int | str:
    if value == "auto" or (isinstance(value, int) and value >= 0):
        return value
    raise ValueError(f'give a number of processes (0 or more) or "auto", got {value!r}')


#: DataLoader worker processes: a number, or "auto" (:func:`loader_workers`).
Workers = Annotated[Union[int, str], AfterValidator(_workers)]
#: ``workers = "auto"`` on CUDA: processes that make patches while the GPU trains.
AUTO_WORKERS_CUDA = 2


def loader_workers(workers: int | str | None, device: str) -> int:
    """DataLoader worker processes for ``workers`` (a number, or ``"auto"``/None) on ``device``.

    auto: none on the CPU. There the model's threads already keep every core busy, and a worker
    that takes a core mid-step stalls the whole thread team until it is done, so a millisecond of
    loading costs the step one to two: ``benchmarks/train.py`` measured the quick 2.5D pipeline at
    0.88-0.91 of the model alone with two workers and 0.98 with the patches made in the training
    process. On CUDA, workers overlap the GPU's work: 2."""
    if isinstance(workers, int):
        return workers
    return AUTO_WORKERS_CUDA if str(device).startswith("cuda") else 0


class ProjectSettings(Strict):
    """``vesuvius.toml``: defaults shared by every experiment of a project."""

    data_root: Path = Field(Path("data/synthetic"), description="Competition-layout data folder.")
    runs_dir: Path = Field(Path("runs"), description="Where runs are recorded.")
    cache_dir: Path | None = Field(None, description="Decoded-volume cache; default <runs_dir>/.cache.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    seed: int = Field(0, description="Default random seed.")
    workers: Workers = Field("auto", description=(
        "DataLoader workers per process; auto: none on the CPU (patches are made in the training process, "
        "whose threads worker processes would stall), 2 on CUDA."))
    folds: int = Field(5, ge=2, description="Number of cross-validation folds.")
    tracker: list[TrackerRef] = Field(default_factory=list, description=(
        "[[tracker]] tables: trackers (TensorBoard, MLflow, ...) that every run of the project reports to; an "
        "experiment's [[tracker]] of the same plugin replaces the project's (enabled = false turns it off)."))
    launcher: LauncherSettings = Field(default_factory=LauncherSettings,
                                       description="vlab run --launcher slurm: the SLURM settings of each job.")


class PluginRef(Strict):
    """A named plugin and its params (validated by the plugin's own Params model)."""

    plugin: str = Field(description="Entry-point name of the plugin.")
    params: dict[str, Any] = Field(default_factory=dict, description="The plugin's parameters.")


class LossTerm(PluginRef):
    weight: float = Field(1.0, ge=0, description="Weight of this term in the summed loss.")
    start_epoch: int = Field(0, ge=0, description="Epochs completed before this term steers training (0: from the "
                                                  "start); until then it is computed and logged only.")


class TrackerRef(PluginRef):
    """A ``[[tracker]]`` table: a trackers plugin that receives a run's params, scalars and pictures."""

    enabled: bool = Field(True, description="false turns off a tracker of this plugin that vesuvius.toml names.")


ProjectSettings.model_rebuild()  # its tracker field names TrackerRef, defined after it


# --- [data.augment] -----------------------------------------------------------------------------
# Each training transform is a table of options with a probability ``p``; ``name = 0.3`` is short
# for ``name = { p = 0.3 }``, and ``name = true`` / ``false`` (files written before the tables)
# mean the default probability / off. The defaults follow nnU-Net's, sized for thin 2.5D windows.


def _augment_shorthand(value: Any) -> Any:
    """A bare probability or a boolean becomes the transform's table."""
    if isinstance(value, bool):
        return {} if value else {"p": 0.0}
    if isinstance(value, (int, float)):
        if not 0 <= value <= 1:  # nan and inf fail this too (and are reported as not finite)
            raise ValueError("a probability is a number from 0 to 1")
        return {"p": float(value)}
    if not isinstance(value, (dict, BaseModel)):
        raise ValueError("give a probability (0 to 1), true or false, or a table such as { p = 0.2 }")
    return value


def _low_high(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError("a range is [low, high] with low <= high")
    return value


#: ``[low, high]``, low <= high.
Range = Annotated[tuple[float, float], AfterValidator(_low_high)]
Probability = Annotated[float, Field(ge=0, le=1)]


def _shorthand(model: type[BaseModel]) -> Any:
    """The field type of one transform: its table, a probability or a boolean."""
    return Annotated[model, BeforeValidator(_augment_shorthand,
                                            json_schema_input_type=Union[Probability, bool, model])]


class AugmentTransform(Strict):
    p: float = Field(0.0, ge=0, le=1, description="Chance that a patch gets this transform; 0 turns it off.")


class FlipOptions(AugmentTransform):
    p: float = Field(0.5, ge=0, le=1, description="Chance of a flip along each axis (D, H, W), each on its own.")


class Rot90Options(AugmentTransform):
    p: float = Field(0.75, ge=0, le=1, description="Chance of 1 to 3 quarter turns of the (H, W) plane; 0.75 "
                                                   "makes the four orientations equally likely. Square (H = W) "
                                                   "windows only: skipped otherwise.")


class AffineOptions(AugmentTransform):
    p: float = Field(0.2, ge=0, le=1, description="Chance of a random rotation and scaling (one resampling).")
    rotate: Union[Annotated[float, Field(ge=0, le=180)], tuple[float, float, float]] = Field(
        15.0, description="Largest rotation in degrees about each axis, or [about D, about H, about W] (about D "
                          "turns the (H, W) plane; about H or W tilts the sheets through the window's depth).")
    scale: Range = Field((0.85, 1.25), description="Range of the zoom factor, drawn for each axis: above 1 "
                                                   "magnifies, below 1 shrinks (the window then sees past the "
                                                   "patch: those voxels become ignore).")

    @field_validator("rotate")
    @classmethod
    def _angles(cls, value: Any) -> Any:
        if isinstance(value, tuple) and not all(0 <= angle <= 180 for angle in value):
            raise ValueError("every angle is from 0 to 180 degrees")
        return value

    @field_validator("scale")
    @classmethod
    def _positive_zoom(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0:
            raise ValueError("a zoom factor is above 0")
        return value


class ElasticOptions(AugmentTransform):
    p: float = Field(0.0, ge=0, le=1, description="Chance of an elastic deformation (MONAI's Rand3DElasticd: "
                                                  "uniform noise per voxel, Gaussian-smoothed, as displacements). "
                                                  "Off by default, as in nnU-Net: it costs about 3 ms of a CPU "
                                                  "core per deformed 16x64x64 patch.")
    sigma: Range = Field((6.0, 8.0), description="Range of the smoothing sigma in voxels: larger, smoother folds.")
    magnitude: Range = Field((100.0, 250.0), description="Range of the factor on the smoothed noise; with the "
                                                         "default sigma, displacements of up to 1 to 3 voxels.")

    @field_validator("sigma")
    @classmethod
    def _positive_sigma(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0:
            raise ValueError("sigma is above 0")
        return value


class NoiseOptions(AugmentTransform):
    p: float = Field(0.15, ge=0, le=1, description="Chance of additive Gaussian noise.")
    std: float = Field(0.05, gt=0, description="Largest standard deviation (the image runs from 0 to 1); each "
                                               "patch draws its own between 0 and this.")


class BlurOptions(AugmentTransform):
    p: float = Field(0.2, ge=0, le=1, description="Chance of a Gaussian blur.")
    sigma: Range = Field((0.5, 1.0), description="Range of the blur's sigma in voxels, drawn for each axis.")


class ContrastOptions(AugmentTransform):
    p: float = Field(0.15, ge=0, le=1, description="Chance of a contrast change: the difference to the patch's "
                                                   "mean times a factor, clipped to the patch's range.")
    factor: Range = Field((0.75, 1.25), description="Range of the contrast factor.")


class GammaOptions(AugmentTransform):
    p: float = Field(0.3, ge=0, le=1, description="Chance of a gamma curve on the patch's range (mean and "
                                                  "spread kept, as nnU-Net does).")
    gamma: Range = Field((0.7, 1.5), description="Range of the gamma exponent.")


class LowResolutionOptions(AugmentTransform):
    p: float = Field(0.25, ge=0, le=1, description="Chance of simulating a coarser scan: downsampled (nearest) by "
                                                   "a zoom factor, then upsampled back (trilinear).")
    zoom: Range = Field((0.5, 1.0), description="Range of the zoom factor, above 0 and at most 1.")

    @field_validator("zoom")
    @classmethod
    def _fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not (0 < value[0] and value[1] <= 1):
            raise ValueError("a zoom factor here is above 0 and at most 1")
        return value


class IntensityOptions(AugmentTransform):
    p: float = Field(0.15, ge=0, le=1, description="Chance of a brightness scale; a shift has the same chance, "
                                                   "drawn on its own.")
    scale: Range = Field((0.75, 1.25), description="Range of the factor on the image.")
    shift: float = Field(0.1, ge=0, description="Largest offset added to the image (which runs from 0 to 1).")


# The field types of [data.augment]: each transform's table, a probability or a boolean.
FlipField = _shorthand(FlipOptions)
Rot90Field = _shorthand(Rot90Options)
AffineField = _shorthand(AffineOptions)
ElasticField = _shorthand(ElasticOptions)
NoiseField = _shorthand(NoiseOptions)
BlurField = _shorthand(BlurOptions)
ContrastField = _shorthand(ContrastOptions)
GammaField = _shorthand(GammaOptions)
LowResolutionField = _shorthand(LowResolutionOptions)
IntensityField = _shorthand(IntensityOptions)


class Augment(Strict):
    """``[data.augment]``: the random transforms of training patches (MONAI's dictionary transforms).

    Geometric ones (flips, rot90, affine, elastic) move the image, label and ignore mask together
    (the label with nearest interpolation); voxels they bring in from outside the patch are labelled
    ignore. The others change the image only, and the hole-stitching task skips them.
    """

    flips: FlipField = Field(default_factory=FlipOptions, description="Random flips.")
    rot90: Rot90Field = Field(default_factory=Rot90Options,
                                            description="Random quarter turns of the (H, W) plane.")
    affine: AffineField = Field(default_factory=AffineOptions,
                                              description="Random rotation and scaling.")
    elastic: ElasticField = Field(default_factory=ElasticOptions,
                                                description="Random elastic deformation.")
    noise: NoiseField = Field(default_factory=NoiseOptions, description="Additive Gaussian noise.")
    blur: BlurField = Field(default_factory=BlurOptions, description="Gaussian blur.")
    intensity: IntensityField = Field(default_factory=IntensityOptions,
                                                    description="Brightness: intensity scale and shift.")
    contrast: ContrastField = Field(default_factory=ContrastOptions, description="Contrast.")
    gamma: GammaField = Field(default_factory=GammaOptions, description="Gamma curve.")
    low_resolution: LowResolutionField = Field(default_factory=LowResolutionOptions,
                                                            description="Simulated low resolution.")


class DataSpec(Strict):
    root: Path | None = Field(None, description="Data folder; default the project's data_root.")
    folds: int | None = Field(None, ge=2, description="Number of folds; default the project's.")
    fold: Union[Annotated[int, Field(ge=0)], Literal["all"]] = Field(
        0, description='The validation fold of this run; "all" trains on every volume and validates on none '
                       "(nnU-Net's fold all): such a run is not validated, an ensemble uses it for test volumes only.")
    group_by: Literal["scroll_id", "id"] = Field("scroll_id", description="Folds never split a group.")
    window: Shape3 = Field((16, 128, 128), description="Training patch shape (D, H, W).")
    foreground_oversample: float = Field(0.33, ge=0, le=1, description="Share of patches centred on surface.")
    augment: Augment = Field(default_factory=Augment)
    ignore_label: int | None = Field(2, description="Label value excluded from losses and the metric.")
    task: Literal["segmentation", "hole_stitching"] = Field(
        "segmentation", description="segmentation: CT in, surface out. hole_stitching: a label with holes punched "
                                    "into its sheets in, the label out (trains a post-processing stitcher).")
    corruption: CorruptionParams = Field(default_factory=CorruptionParams,
                                         description="hole_stitching: how inputs are damaged (holes, radius, dust...).")

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
    workers: Workers | None = Field(None, description="DataLoader workers (a number, or auto); default the project's.")
    validate_every: int = Field(1, ge=1, description="Validate every N epochs (and after the last).")
    ema: float | None = Field(None, gt=0, lt=1, description=(
        "Decay of an exponential moving average of the weights (e.g. 0.999), updated after each optimizer step; "
        "validation and prediction use the average, checkpoints keep the raw weights beside it."))
    init: str | None = Field(None, description=(
        "Start from trained weights: a run directory (its best checkpoint), <experiment>/<run-id> under runs_dir, "
        "or a checkpoint file. Another window size is fine; layers must match."))


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


EXPERIMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
Combine = Literal["mean", "weighted", "logit_mean"]


class EnsembleMember(Strict):
    """One member of an ``[ensemble]``: a run directory, or an experiment's fold runs under runs_dir.

    A plain string in ``members`` is read as ``{ run = "<string>" }``.
    """

    run: str | None = Field(None, description="A run directory: a path, or <experiment>/<run-id> in runs_dir.")
    experiment: str | None = Field(None, pattern=EXPERIMENT_NAME,
                                   description="An experiment name: its newest finished run of each fold.")
    folds: Union[Literal["all"], list[Annotated[int, Field(ge=0)]]] = Field(
        "all", description='With experiment: "all" (every fold, out-of-fold validation) or a list, e.g. [0, 2].')
    inference: dict[str, Any] = Field(default_factory=dict, description=(
        '[inference] keys this member predicts with, e.g. { tta = ["flip0"] }.'))

    @field_validator("folds", mode="before")
    @classmethod
    def _one_fold(cls, folds: Any) -> Any:
        return [folds] if isinstance(folds, int) and not isinstance(folds, bool) else folds

    @field_validator("inference")
    @classmethod
    def _inference_keys(cls, inference: dict[str, Any]) -> dict[str, Any]:
        InferenceSpec.model_validate(inference)  # unknown keys and bad values fail here, not at prediction
        return inference

    @model_validator(mode="after")
    def _run_or_experiment(self) -> "EnsembleMember":
        if (self.run is None) == (self.experiment is None):
            raise ValueError('give either run = "<run directory>" or experiment = "<name>" (with folds)')
        if self.run is not None and self.folds != "all":  # "all" is the default, so records round-trip
            raise ValueError("folds goes with experiment; a run directory is one fold already")
        if isinstance(self.folds, list) and not self.folds:
            raise ValueError('folds lists no fold; give "all" or fold numbers such as [0, 1]')
        return self

    @property
    def label(self) -> str:
        """A short name for tables: the experiment, or the run directory's experiment folder."""
        if self.experiment is not None:
            return self.experiment
        path = Path(self.run)
        return path.parent.name or path.name


def _string_members(schema: dict) -> None:
    """In the JSON schema, a member may also be a plain string (read as a run directory)."""
    schema["items"] = {"anyOf": [{"type": "string"}, schema["items"]]}


class EnsembleSpec(Strict):
    """``[ensemble]``: combine the surface probabilities of trained runs; see :mod:`vesuvius_lab.core.inference.ensemble`."""

    members: list[EnsembleMember] = Field(min_length=1, json_schema_extra=_string_members, description=(
        'Run directories ("runs/x/fold0-...") or tables { experiment = "name", folds = "all" }.'))
    weights: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="One positive weight per member (combine = weighted or logit_mean).")
    combine: Combine = Field("mean", description=(
        "mean of probabilities, weighted mean of probabilities, or logit_mean (mean of logits, then sigmoid)."))

    @field_validator("members", mode="before")
    @classmethod
    def _paths_as_tables(cls, members: Any) -> Any:
        return [{"run": m} if isinstance(m, str) else m for m in members] if isinstance(members, list) else members

    @model_validator(mode="after")
    def _weights_fit(self) -> "EnsembleSpec":
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ValueError(f"weights has {len(self.weights)} values for {len(self.members)} members; give one "
                             "per member, in the same order")
        if self.combine == "weighted" and self.weights is None:
            raise ValueError('combine = "weighted" needs weights, one per member')
        if self.combine == "mean" and self.weights is not None:
            raise ValueError('combine = "mean" ignores weights; set combine = "weighted" (or "logit_mean"), '
                             "or remove weights")
        return self

    @property
    def label(self) -> str:
        """The model column of the leaderboard, e.g. ``ensemble(unet25d+monai-unet)``."""
        return ensemble_label(self.members)


def ensemble_label(members: list[EnsembleMember]) -> str:
    return f"ensemble({'+'.join(member.label for member in members)})"


def ensemble_column(table: Any) -> str:
    """The leaderboard's model column for a recorded ``ensemble`` table; tolerant of a damaged record."""
    try:
        return EnsembleSpec.model_validate(table).label
    except ValueError:
        return "ensemble(?)"


class TuneRange(Strict):
    """One dimension of a ``[tune]`` search space: a range (``low``, ``high``, optional ``log``/``step``)
    or ``choices``. Integer bounds make an integer dimension."""

    low: float | int | None = Field(None, description="Smallest value tried (with high).")
    high: float | int | None = Field(None, description="Largest value tried (with low).")
    log: bool = Field(False, description="Sample on a log scale (low must be > 0).")
    step: float | int | None = Field(None, gt=0, description="Only multiples of step above low.")
    choices: list[Any] | None = Field(None, min_length=1, description="The values to choose from, instead of a range.")

    @model_validator(mode="after")
    def _range_or_choices(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or low/high (with log or step), not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices (a list of values)")
        if not self.low < self.high:
            raise ValueError(f"low must be below high (got low = {self.low}, high = {self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log = true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @property
    def integer(self) -> bool:
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in (self.low, self.high, self.step if self.step else 1))

    def probes(self) -> list[Any]:
        """Values that stand for the whole dimension when the key is validated: its ends, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


#: The experiment's fields that only `vlab tune` reads: not part of what a run trains, nor of its columns.
TUNING_FIELDS = ("tune", "tune_options")
#: Keys of ``[tune]`` that say how to search rather than what: moved into ``Experiment.tune_options``.
TUNE_OPTION_KEYS = ("objective", "k", "group_by", "plateau")


class TuneOptions(Strict):
    """How ``vlab tune`` scores and chooses a chain; written in ``[tune]`` beside the ranges (docs/tuning.md)."""

    objective: Literal["mean", "worst_group", "mean_minus_std"] = Field(
        "mean", description='What a search maximises over the out-of-fold volumes: "mean" (over volumes), '
                            '"worst_group" (the worst group\'s mean) or "mean_minus_std" (mean over groups - k std).')
    k: float = Field(1.0, ge=0, description="The standard deviations subtracted by objective = \"mean_minus_std\".")
    group_by: Literal["scroll", "fold"] = Field(
        "scroll", description="The groups of the robust objectives and the notices: the volumes' scrolls (when they "
                              "come from two at least), else the folds that held them out.")
    plateau: float = Field(0.0, ge=0, le=0.5, description=(
        "0: choose the best trial. r > 0: re-score the best trials at their neighbours (each key moved by r of its "
        "range) and choose the one whose neighbourhood scores best."))


def _default_losses() -> list[LossTerm]:
    return [LossTerm(plugin="dice", weight=0.5), LossTerm(plugin="bce", weight=0.5)]


class Experiment(Strict):
    """One experiment file (after ``extends`` are merged)."""

    # Editors validating against `vlab schema` need exactly one of [model] and [ensemble] too.
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["model"]}, {"required": ["ensemble"]}]})

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100,
                      description="Run folder name: letters, digits, '.', '_' and '-'.")
    description: str = ""
    extends: Union[str, list[str], None] = Field(None, description="Parent file(s), relative to this file.")
    data: DataSpec = Field(default_factory=DataSpec)
    model: PluginRef | None = Field(None, description="The network (a models plugin); give [model] or [ensemble].")
    ensemble: EnsembleSpec | None = Field(None, description="Combine trained runs instead of training "
                                                            "(`vlab ensemble`).")
    loss: list[LossTerm] = Field(default_factory=_default_losses, min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    postprocess: list[PluginRef] = Field(default_factory=list)
    tracker: list[TrackerRef] = Field(default_factory=list, description=(
        "[[tracker]] tables: where this run's params, scalars and pictures are sent besides its own records "
        "(TensorBoard, MLflow, ...); added to vesuvius.toml's, whose tracker of the same plugin this one replaces."))
    sweep: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict,
        description='A grid of runs: key path -> values, e.g. "model.params.encoder" = ["resnet18", "resnet34"]. '
                    "`vlab run` trains one experiment per combination, each validated like --set KEY=VALUE.")

    tune: dict[str, TuneRange] = Field(
        default_factory=dict,
        description='Search space of `vlab tune`: key path -> range or choices, e.g. "postprocess.0.params.low" = '
                    '{ low = 0.1, high = 0.5 } or "inference.threshold" = { choices = [0.3, 0.4, 0.5] }. Tuned on '
                    "the out-of-fold probabilities of the trained runs, against the competition score.")

    tune_options: TuneOptions = Field(default_factory=TuneOptions, description=(
        f"How `vlab tune` scores and chooses; written in [tune] itself ({', '.join(TUNE_OPTION_KEYS)})."))

    #: Fields whose keys the file writes in another table: where a problem with them is reported.
    TOML_HOMES: ClassVar[dict[str, str]] = {"tune_options": "tune"}

    @model_validator(mode="before")
    @classmethod
    def _tune_options_from_tune(cls, data: Any) -> Any:
        """``[tune]`` holds the search's options beside its ranges: move them to ``tune_options``."""
        if not isinstance(data, dict) or not isinstance(data.get("tune"), dict):
            return data
        options = {key: value for key, value in data["tune"].items() if key in TUNE_OPTION_KEYS}
        if not options:
            return data
        given = data.get("tune_options")
        merged = {**given, **options} if isinstance(given, dict) else options
        ranges = {key: value for key, value in data["tune"].items() if key not in TUNE_OPTION_KEYS}
        return {**data, "tune": ranges, "tune_options": merged}

    @field_validator("tune", mode="before")
    @classmethod
    def _dotted_tune_keys(cls, tune: Any) -> Any:
        """Accept unquoted dotted keys: TOML reads `a.b = { low = 1, high = 2 }` as nested tables."""
        return _flatten_ranges(tune) if isinstance(tune, dict) else tune

    @field_validator("sweep", mode="before")
    @classmethod
    def _dotted_sweep_keys(cls, sweep: Any) -> Any:
        """Accept unquoted dotted keys too: TOML reads `a.b = [..]` as nested tables."""
        def flatten(table: dict, prefix: str = "") -> dict:
            flat = {}
            for key, value in table.items():
                path = f"{prefix}{key}"
                flat.update(flatten(value, path + ".") if isinstance(value, dict) else {path: value})
            return flat

        return flatten(sweep) if isinstance(sweep, dict) else sweep

    @field_validator("ensemble")
    @classmethod
    def _model_or_ensemble(cls, ensemble: EnsembleSpec | None, info: ValidationInfo) -> EnsembleSpec | None:
        """Exactly one of the two; checked on `ensemble` (after `model`) so the error points at the file's table."""
        if "model" not in info.data:
            return ensemble  # [model] itself is invalid and reported already
        if info.data["model"] is None and ensemble is None:
            raise ValueError("give a [model] table (an experiment to train) or an [ensemble] table (trained runs "
                             "to combine)")
        if info.data["model"] is not None and ensemble is not None:
            raise ValueError("give either [model] or [ensemble], not both; an ensemble file must not extend a "
                             "file with a [model] table (copy the [inference] and [[postprocess]] it needs)")
        return ensemble

    @property
    def model_label(self) -> str:
        """The model plugin's name, or ``ensemble(a+b)`` for an ensemble."""
        return self.model.plugin if self.model is not None else self.ensemble.label

    @property
    def inference_window(self) -> Shape3:
        return self.inference.window or self.data.window
