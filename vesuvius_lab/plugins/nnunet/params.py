"""The ``params`` table of the ``nnunet`` model plugin."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: nnU-Net's planners by class name, with the plans name each one writes and its default GPU
#: memory target in GB (the "preset"): the residual-encoder presets M, L and XL and the original
#: ``ExperimentPlanner``.
PLANNERS: dict[str, tuple[str, str, float]] = {
    # class name: (module, plans name, default memory target in GB)
    "nnUNetPlannerResEncM": ("nnunetv2.experiment_planning.experiment_planners.residual_unets."
                             "residual_encoder_unet_planners", "nnUNetResEncUNetMPlans", 8),
    "nnUNetPlannerResEncL": ("nnunetv2.experiment_planning.experiment_planners.residual_unets."
                             "residual_encoder_unet_planners", "nnUNetResEncUNetLPlans", 24),
    "nnUNetPlannerResEncXL": ("nnunetv2.experiment_planning.experiment_planners.residual_unets."
                              "residual_encoder_unet_planners", "nnUNetResEncUNetXLPlans", 40),
    "ExperimentPlanner": ("nnunetv2.experiment_planning.experiment_planners.default_experiment_planner",
                          "nnUNetPlans", 8),
}

Configuration = Literal["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Shrink(_Strict):
    """Overrides applied to the planned configuration, e.g. a network small enough for a CPU."""

    patch_size: list[int] | None = Field(
        None, min_length=2, max_length=3,
        description="Patch size (3 sides for 3d configurations, 2 for 2d); each side divisible by 2**(stages-1).")
    n_stages: int | None = Field(None, ge=2, le=8, description="Resolution stages of the U-Net (the plan's first N).")
    features_per_stage: list[int] | None = Field(
        None, min_length=2, description="Feature maps per stage, one per stage, e.g. [8, 16, 32].")
    batch_size: int | None = Field(None, ge=1, description="Patches per training step (summed over DDP processes).")

    @field_validator("patch_size", "features_per_stage")
    @classmethod
    def _positive(cls, value: list[int] | None, info) -> list[int] | None:
        return _at_least_one(value, info.field_name)


def _at_least_one(value: list[int] | None, name: str) -> list[int] | None:
    if value is not None and min(value) < 1:
        raise ValueError(f"every entry of {name} must be at least 1, got {value}")
    return value


class NnUNetParams(_Strict):
    planner: Literal["nnUNetPlannerResEncM", "nnUNetPlannerResEncL", "nnUNetPlannerResEncXL",
                     "ExperimentPlanner"] = Field(
        "nnUNetPlannerResEncM", description="nnU-Net experiment planner (ResEnc presets M/L/XL or the original one).")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="GPU memory target of the planner in GB; default the preset's (M 8, L 24, XL 40).")
    configuration: Configuration = Field("3d_fullres", description="Which planned configuration to train.")
    trainer: str = Field(
        "nnUNetTrainer", min_length=1,
        description='Trainer class: a name from nnunetv2 (e.g. "nnUNetTrainer_onlyMirror01"), one shipped with this '
                    'plugin ("nnUNetTrainerSkeletonRecall": CE + Dice + Skeleton Recall) or "package.module:Class".')
    patch_size: list[int] | None = Field(
        None, min_length=2, max_length=3,
        description="Patch size of the planned configuration, e.g. [128, 128, 128] (3 sides for 3d, 2 for 2d), the "
                    "planned network kept; each side divisible by the network's downsampling. Not with "
                    "shrink.patch_size.")
    initial_lr: float | None = Field(
        None, gt=0, description="Initial learning rate of nnU-Net's SGD + poly schedule; default the trainer's (1e-2).")
    momentum: float | None = Field(
        None, ge=0, lt=1,
        description="Nesterov momentum of nnU-Net's SGD; default the trainer's (0.99). 0.99 averages ~100 steps and "
                    "suits nnU-Net's 250 000; runs of a few hundred iterations need about 0.9.")
    checkpoint: Literal["final", "best"] = Field("final", description="Checkpoint used for prediction.")
    mirroring: bool | None = Field(
        None, description="nnU-Net's mirroring TTA at prediction: true = all axes the trainer allows, false = none, "
                          "unset = the flips listed in [inference] tta.")
    val_iterations_per_epoch: int | None = Field(
        None, ge=1, description="Validation batches per epoch; default iterations_per_epoch / 5 (nnU-Net's 250:50).")
    final_validation: bool = Field(
        False, description="After training, run nnU-Net's own validation (its Dice summary in the run folder).")
    save_probabilities: bool = Field(
        False, description="With final_validation: also export .npz probabilities (nnUNetv2_train --npz).")
    preprocess_workers: int = Field(
        1, ge=1, description="Processes for fingerprinting, preprocessing and validation export (nnUNet_def_n_proc).")
    augmentation_workers: int | None = Field(
        None, ge=0, description="Data-augmentation processes per GPU (nnUNet_n_proc_DA); 0 = in the training "
                                "process; default the experiment's train.workers.")
    shrink: Shrink | None = Field(None, description="Overrides of the planned network for quick experiments.")

    @field_validator("patch_size")
    @classmethod
    def _positive_sides(cls, value: list[int] | None) -> list[int] | None:
        return _at_least_one(value, "patch_size")
