"""Apply the ``shrink`` and ``patch_size`` params to a planned configuration.

``shrink`` makes a smaller network (fewer stages, fewer features, a smaller patch and batch);
``patch_size`` changes only the patch, keeping the planned network (e.g. fine-tuning at 192^3 a
network planned at 128^3). Preprocessing (spacing, normalisation) stays as planned, so the cached
preprocessed data is reused.
"""

from __future__ import annotations

import copy
import math

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.plugins.nnunet.params import Shrink

SHRUNK_SUFFIX = "__shrunk"
_PER_STAGE = ("kernel_sizes", "strides", "n_blocks_per_stage", "n_conv_per_stage")


def flatten_configuration(plans: dict, configuration: str) -> dict:
    """The configuration with ``inherits_from`` resolved, as nnU-Net's PlansManager does."""
    configs = plans["configurations"]
    config = copy.deepcopy(configs[configuration])
    while "inherits_from" in config:
        parent = copy.deepcopy(configs[config.pop("inherits_from")])
        parent.update(config)
        config = parent
    return config


def apply_shrink(plans: dict, configuration: str, shrink: Shrink | None) -> dict:
    """A copy of ``plans`` whose ``configuration`` is shrunk; its plans name gets ``__shrunk``."""
    if shrink is None or not shrink.model_dump(exclude_none=True):
        return plans
    plans = copy.deepcopy(plans)
    config = flatten_configuration(plans, configuration)
    arch = config["architecture"]["arch_kwargs"]
    planned_stages = arch["n_stages"]
    stages = shrink.n_stages or planned_stages
    if stages > planned_stages:
        raise UserError(f"params.shrink.n_stages = {stages}, but the planned {configuration} network has only "
                        f"{planned_stages} stages; shrink can only remove stages.")
    if shrink.features_per_stage is not None and len(shrink.features_per_stage) != stages:
        raise UserError(f"params.shrink.features_per_stage has {len(shrink.features_per_stage)} entries for "
                        f"{stages} stages; give one feature count per stage.")
    arch["n_stages"] = stages
    for key in _PER_STAGE:
        if key in arch:
            arch[key] = arch[key][:stages]
    if "n_conv_per_stage_decoder" in arch:
        arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][:stages - 1]
    arch["features_per_stage"] = list(shrink.features_per_stage or arch["features_per_stage"][:stages])
    if shrink.patch_size is not None:
        if len(shrink.patch_size) != len(config["patch_size"]):
            raise UserError(f"params.shrink.patch_size has {len(shrink.patch_size)} sides; the {configuration} "
                            f"configuration needs {len(config['patch_size'])}.")
        config["patch_size"] = list(shrink.patch_size)
    check_patch_divisible(config["patch_size"], arch["strides"])
    if shrink.batch_size is not None:
        config["batch_size"] = shrink.batch_size
    plans["configurations"][configuration] = config
    plans["plans_name"] = plans["plans_name"] + SHRUNK_SUFFIX
    return plans


def customize_plans(plans: dict, configuration: str, shrink: Shrink | None, patch_size: list[int] | None) -> dict:
    """``plans`` with ``shrink`` and then ``patch_size`` applied (a copy when anything changes)."""
    if patch_size is not None and shrink is not None and shrink.patch_size is not None:
        raise UserError(f"model.params: patch_size {list(patch_size)} and shrink.patch_size {shrink.patch_size} both "
                        "set the patch size. Keep one of them.")
    return apply_patch_size(apply_shrink(plans, configuration, shrink), configuration, patch_size)


def apply_patch_size(plans: dict, configuration: str, patch_size: list[int] | None) -> dict:
    """A copy of ``plans`` whose ``configuration`` trains (and predicts) with patches of ``patch_size``."""
    if patch_size is None:
        return plans
    plans = copy.deepcopy(plans)
    config = flatten_configuration(plans, configuration)
    if len(patch_size) != len(config["patch_size"]):
        raise UserError(f"params.patch_size has {len(patch_size)} sides; the {configuration} configuration needs "
                        f"{len(config['patch_size'])}.")
    check_patch_divisible(patch_size, config["architecture"]["arch_kwargs"]["strides"], key="patch_size")
    config["patch_size"] = list(patch_size)
    plans["configurations"][configuration] = config
    return plans


def check_patch_divisible(patch_size: list[int], strides: list, key: str = "shrink.patch_size") -> None:
    """Each patch side must be divisible by the network's total downsampling along that axis."""
    factors = [math.prod(stride[axis] for stride in strides) for axis in range(len(patch_size))]
    if any(side % factor for side, factor in zip(patch_size, factors)):
        raise UserError(f"params.{key} {list(patch_size)}: each side must be divisible by the network's "
                        f"downsampling {factors} (the product of its strides per axis); change the patch"
                        f"{' or n_stages' if key.startswith('shrink') else ''}.")
