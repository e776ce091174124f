"""3D models from MONAI: SwinUNETR, UNet, SegResNet and DynUNet, taking (B, 1, D, H, W) windows directly.

Each plugin's ``check`` tells ``vlab validate`` which windows the network cannot take (and the
nearest ones it can), using arithmetic only, so validation never imports MONAI.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.registry import plugin
from vesuvius_lab.core.contract.windows import spec_windows, window_problems


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _at_least(minimum: int, values: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``values`` unchanged, or a ValueError when an entry is below ``minimum``."""
    if min(values, default=minimum) < minimum:
        raise ValueError(f"every entry is {what}, so at least {minimum}; got {list(values)}")
    return values


def _window_messages(spec: Any, multiples, minimums=(1, 1, 1), network: str = "this network") -> Iterator[tuple[str, str]]:
    for message in window_problems(spec_windows(spec), multiples, minimums, network):
        yield "", message


def _supported_kwargs(cls, wanted: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Keep the keyword arguments this MONAI version's constructor takes.

    A setting the installed constructor lacks is dropped when it equals our default (nothing is
    lost) and is an error otherwise, naming the MONAI version.
    """
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {}
    for key, value in wanted.items():
        if key in accepted:
            kwargs[key] = value
        elif value != defaults.get(key, object()):
            import monai

            raise UserError(f"model.params.{key}: the installed MONAI {monai.__version__} {cls.__name__} has no "
                            f'"{key}" argument. Remove the setting or upgrade MONAI.')
    return kwargs


# --------------------------------------------------------------------------- SwinUNETR

#: SwinUNETR embeds 2x2x2 patches and then halves the grid four times: 2**5 = 32 per side, and
#: the bottleneck must be larger than 1x1x1 for its instance norm, hence at least 64.
SWIN_MULTIPLE, SWIN_MINIMUM = 32, 64


class SwinUNETRParams(_Params):
    feature_size: int = Field(24, ge=12, description="Embedding width of the first stage; a multiple of 12.")
    depths: tuple[int, int, int, int] = Field((2, 2, 2, 2), description="Swin blocks in each of the 4 stages (each >= 1).")
    num_heads: tuple[int, int, int, int] = Field(
        (3, 6, 12, 24), description="Attention heads in each stage; each divides its stage's width.")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="Dropout rate.")
    attn_drop_rate: float = Field(0.0, ge=0, lt=1, description="Attention dropout rate.")
    dropout_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth rate.")
    use_checkpoint: bool = Field(False, description="Gradient checkpointing: less memory, about a third more compute.")
    norm_name: Literal["instance", "batch"] = Field("instance", description="Normalisation in the convolutional decoder.")
    use_v2: bool = Field(False, description="SwinUNETR-v2: a residual conv block before each Swin stage.")

    @field_validator("feature_size")
    @classmethod
    def _multiple_of_12(cls, value: int) -> int:
        if value % 12:
            lower, upper = value // 12 * 12, value // 12 * 12 + 12
            raise ValueError(f"feature_size must be a multiple of 12 (MONAI's SwinUNETR requires it); "
                             f"try {lower or upper} or {upper}")
        return value

    @field_validator("depths", "num_heads")
    @classmethod
    def _positive(cls, value: tuple[int, ...], info) -> tuple[int, ...]:
        what = "a count of Swin blocks" if info.field_name == "depths" else "a count of attention heads"
        return _at_least(1, value, what)

    @model_validator(mode="after")
    def _heads_divide_widths(self):
        for stage, heads in enumerate(self.num_heads):
            width = self.feature_size * 2 ** stage
            if width % heads:
                raise ValueError(f"stage {stage} has width {width} (feature_size * 2**{stage}), which "
                                 f"num_heads[{stage}] = {heads} does not divide")
        return self


def check_swinunetr(params: SwinUNETRParams, spec: Any) -> Iterator[tuple[str, str]]:
    """Every side of both windows a multiple of 32 and at least 64."""
    yield from _window_messages(spec, (SWIN_MULTIPLE,) * 3, (SWIN_MINIMUM,) * 3, "SwinUNETR")


@plugin(SwinUNETRParams, check=check_swinunetr)
def monai_swinunetr(params: SwinUNETRParams, *, window, in_channels: int = 1, out_channels: int = 1, **context):
    """SwinUNETR (MONAI): a Swin transformer encoder with a convolutional UNet decoder."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, **swinunetr_kwargs(SwinUNETR, params, window))


def swinunetr_kwargs(cls, params: SwinUNETRParams, window) -> dict[str, Any]:
    """Constructor arguments for the installed SwinUNETR ``cls``, whatever its MONAI version."""
    wanted = {"spatial_dims": 3, **params.model_dump()}
    kwargs = _supported_kwargs(cls, wanted, SwinUNETRParams().model_dump())
    if "img_size" in inspect.signature(cls.__init__).parameters:  # MONAI before 1.5 required it
        kwargs["img_size"] = tuple(int(s) for s in window)
    return kwargs


# --------------------------------------------------------------------------- UNet

Stride = Union[int, tuple[int, int, int]]


class UNetParams(_Params):
    channels: tuple[int, ...] = Field((16, 32, 64, 128, 256), min_length=2, description="Features per level, top to bottom.")
    strides: tuple[Stride, ...] = Field((2, 2, 2, 2), min_length=1, description=(
        "Downsampling between levels: one per level but the last; an int or [D, H, W] (e.g. [1, 2, 2] keeps depth)."))
    num_res_units: int = Field(2, ge=0, description="Residual units per level (0 = plain convolutions).")
    norm: Literal["instance", "batch"] = Field("instance", description="Normalisation layer.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout rate.")

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return _at_least(1, value, "a feature count")

    @model_validator(mode="after")
    def _one_stride_per_step(self):
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides needs one entry per step between levels: {len(self.channels)} channels "
                             f"give {len(self.channels) - 1} steps, but strides has {len(self.strides)}")
        if any(s < 1 for stride in self.strides for s in _per_axis(stride)):
            raise ValueError("every stride must be at least 1")
        return self

    @property
    def multiples(self) -> tuple[int, int, int]:
        """What each side must be a multiple of: the product of that axis's strides."""
        return tuple(math.prod(_per_axis(stride)[axis] for stride in self.strides) for axis in range(3))


def _per_axis(stride: Stride) -> tuple[int, int, int]:
    return (stride,) * 3 if isinstance(stride, int) else tuple(stride)


def check_unet(params: UNetParams, spec: Any) -> Iterator[tuple[str, str]]:
    """Each side a multiple of its axis's stride product; a bottleneck > 1 voxel where the norm needs it."""
    multiples = params.multiples
    yield from _window_messages(spec, multiples, network=f"this UNet (strides {list(params.strides)})")
    if params.norm == "instance":
        for key, window in spec_windows(spec).items():
            if tuple(window) == multiples:
                yield "strides", (f"{key} = {list(window)} shrinks to a single voxel at the bottom of this UNet, "
                                  "where instance norm fails during training. Use a window twice as large "
                                  "on one axis, one stride fewer, or norm = \"batch\".")
    elif tuple(spec.data.window) == multiples and spec.train.batch_size == 1:
        yield "norm", (f"data.window = {list(spec.data.window)} shrinks to a single voxel at the bottom of this "
                       "UNet and [train] batch_size = 1, so batch norm sees one value per channel there and fails "
                       "at the first training step. Raise batch_size, use a window twice as large on one axis, "
                       "or one stride fewer.")


@plugin(UNetParams, check=check_unet)
def monai_unet(params: UNetParams, *, window, in_channels: int = 1, out_channels: int = 1, **context):
    """Residual 3D UNet (MONAI): the plain, fast baseline."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=params.channels,
        strides=tuple(s if isinstance(s, int) else tuple(s) for s in params.strides),
        num_res_units=params.num_res_units,
        norm=params.norm,
        dropout=params.dropout,
    )


# --------------------------------------------------------------------------- SegResNet


class SegResNetParams(_Params):
    init_filters: int = Field(8, ge=8, description=(
        "Features of the first level (doubling per level); a multiple of 8 (group norm with 8 groups)."))
    blocks_down: tuple[int, ...] = Field((1, 2, 2, 4), min_length=2, description="Residual blocks per encoder level.")
    blocks_up: tuple[int, ...] = Field((1, 1, 1), min_length=1, description="Residual blocks per decoder level: one fewer than blocks_down.")
    dropout_prob: float | None = Field(None, ge=0, lt=1, description="Dropout after the first convolution; None = off.")

    @field_validator("init_filters")
    @classmethod
    def _groups_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"init_filters must be a multiple of 8 (its group norm uses 8 groups); "
                             f"try {value // 8 * 8 or 8}")
        return value

    @field_validator("blocks_down", "blocks_up")
    @classmethod
    def _block_counts(cls, value: tuple[int, ...], info) -> tuple[int, ...]:
        return _at_least(0, value, "a count of residual blocks")

    @model_validator(mode="after")
    def _decoder_matches_encoder(self):
        if len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(f"blocks_up needs {len(self.blocks_down) - 1} entries (one fewer than blocks_down), "
                             f"got {len(self.blocks_up)}")
        return self


def check_segresnet(params: SegResNetParams, spec: Any) -> Iterator[tuple[str, str]]:
    """Each side a multiple of 2**(levels - 1)."""
    multiple = 2 ** (len(params.blocks_down) - 1)
    yield from _window_messages(spec, (multiple,) * 3, network=f"SegResNet with {len(params.blocks_down)} levels")


@plugin(SegResNetParams, check=check_segresnet)
def monai_segresnet(params: SegResNetParams, *, window, in_channels: int = 1, out_channels: int = 1, **context):
    """SegResNet (MONAI): a residual encoder-decoder with group norm, light on memory."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        init_filters=params.init_filters,
        blocks_down=params.blocks_down,
        blocks_up=params.blocks_up,
        dropout_prob=params.dropout_prob,
    )


# --------------------------------------------------------------------------- DynUNet

Kernel = Union[int, tuple[int, int, int]]
Shape3 = tuple[int, int, int]


class DynUNetParams(_Params):
    strides: tuple[Stride, ...] | None = Field(None, description=(
        "Stride of each level, top to bottom, the first 1 (full resolution): an int or [D, H, W]. "
        "None = planned from data.window like nnU-Net: every axis of at least 2 * min_edge voxels "
        "is halved, up to max_downsamplings times."))
    kernel_size: tuple[Kernel, ...] | None = Field(None, description=(
        "Convolution kernel of each level (odd sides), one per stride; None = 3 everywhere "
        "(nnU-Net's choice for isotropic CT). Needs strides."))
    min_edge: int = Field(4, ge=1, description=(
        "Planned strides only: the smallest side a feature map is halved to (nnU-Net: 4)."))
    max_downsamplings: int = Field(5, ge=2, description=(
        "Planned strides only: at most this many halvings per axis (nnU-Net's 128^3 plan has 5); "
        "keeps the same network when fine-tuning at a larger window."))
    filters: tuple[int, ...] | None = Field(None, description=(
        "Features of each level, top to bottom, one per level; None = base_filters doubling per level "
        "up to max_filters."))
    base_filters: int = Field(32, ge=1, description="Features of the top level when filters is None (nnU-Net: 32).")
    max_filters: int = Field(320, ge=1, description="Most features of a level when filters is None (nnU-Net: 320).")
    deep_supervision: int = Field(2, ge=0, description=(
        "Extra output heads on the decoder's lower levels, each trained with the losses at weights "
        "1/2**i (nnU-Net's deep supervision); 0 = off. At most the number of levels - 2."))
    res_block: bool = Field(False, description="Residual blocks (as nnU-Net's residual encoders) instead of plain conv pairs.")
    norm_name: Literal["instance", "batch"] = Field("instance", description="Normalisation layer (instance: affine, as nnU-Net).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout rate.")

    @field_validator("filters")
    @classmethod
    def _positive_filters(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if value is None else _at_least(1, value, "a feature count")

    @model_validator(mode="after")
    def _consistent(self):
        given = self.model_fields_set
        if self.strides is None:
            if self.kernel_size is not None:
                raise ValueError("kernel_size needs strides (one kernel per level); set both, or neither "
                                 "to plan them from data.window")
        else:
            _check_strides(self.strides)
            planning = sorted({"min_edge", "max_downsamplings"} & given)
            if planning:
                one = len(planning) == 1
                raise ValueError(f"{' and '.join(planning)} {'shapes' if one else 'shape'} only strides planned "
                                 f"from the window; remove {'it' if one else 'them'}, or remove strides to have "
                                 "them planned")
            if self.kernel_size is not None:
                _check_kernels(self.kernel_size, self.strides)
        if self.filters is not None and {"base_filters", "max_filters"} & given:
            raise ValueError("set either filters (one per level) or base_filters/max_filters, not both")
        if self.max_filters < self.base_filters:
            raise ValueError(f"max_filters ({self.max_filters}) is below base_filters ({self.base_filters})")
        if self.strides is not None:
            if self.filters is not None and len(self.filters) != len(self.strides):
                raise ValueError(f"filters needs one entry per level: {len(self.strides)} strides, "
                                 f"but {len(self.filters)} filters")
            if self.deep_supervision > len(self.strides) - 2:
                raise ValueError(_too_many_heads(self.deep_supervision, len(self.strides)))
        return self


def _check_strides(strides) -> None:
    if len(strides) < 3:
        raise ValueError(f"strides needs at least 3 levels (MONAI's DynUNet downsamples at least twice); "
                         f"got {len(strides)}: {list(strides)}")
    per_axis = [_per_axis(s) for s in strides]
    if any(s < 1 for stride in per_axis for s in stride):
        raise ValueError("every stride must be at least 1")
    if per_axis[0] != (1, 1, 1):
        raise ValueError(f"the first stride must be 1 (the top level keeps the window's resolution, so the "
                         f"logits cover the window); got {list(strides)[0]}")


def _check_kernels(kernels, strides) -> None:
    if len(kernels) != len(strides):
        raise ValueError(f"kernel_size needs one entry per stride: {len(strides)} strides, {len(kernels)} kernels")
    for level, (kernel, stride) in enumerate(zip(kernels, strides)):
        for k, s in zip(_per_axis(kernel), _per_axis(stride)):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"kernel_size[{level}] = {kernel}: every kernel side must be odd (1, 3, 5, ...) "
                                 "so that the convolutions keep the feature map's size")
            if k < s - 1:
                raise ValueError(f"kernel_size[{level}] = {kernel} is too small for stride {stride}: MONAI needs "
                                 "kernel >= stride - 1 on each axis (no negative padding)")


def _too_many_heads(heads: int, levels: int) -> str:
    room = max(levels - 2, 0)
    return (f"deep_supervision = {heads}, but a DynUNet of {levels} levels has room for at most {room} extra "
            f"head{'s' if room != 1 else ''} (one per decoder level below the top, the bottleneck excluded); "
            f"use at most {room}, or 0 to turn it off")


def plan_strides(window, min_edge: int = 4, max_downsamplings: int = 5) -> list[Shape3]:
    """nnU-Net's planner (``get_pool_and_conv_props``) for isotropic voxels: halve, at each level,
    every axis still at least ``2 * min_edge`` (a lone axis: ``3 * min_edge``) and halved fewer than
    ``max_downsamplings`` times. The first stride is 1."""
    size, halvings = [int(s) for s in window], [0, 0, 0]
    strides: list[Shape3] = [(1, 1, 1)]
    while True:
        axes = [a for a in range(3) if size[a] >= 2 * min_edge and halvings[a] < max_downsamplings]
        if not axes or (len(axes) == 1 and size[axes[0]] < 3 * min_edge):
            return strides
        strides.append(tuple(2 if a in axes else 1 for a in range(3)))
        for a in axes:
            halvings[a] += 1
            size[a] = -(-size[a] // 2)


def dynunet_plan(params: DynUNetParams, window) -> tuple[list[Shape3], list[Shape3], list[int]]:
    """(kernels, strides, filters) per level: the params' own, or planned from ``window``."""
    if params.strides is None:
        strides = plan_strides(window, params.min_edge, params.max_downsamplings)
    else:
        strides = [_per_axis(s) for s in params.strides]
    kernels = [_per_axis(k) for k in params.kernel_size] if params.kernel_size else [(3, 3, 3)] * len(strides)
    filters = list(params.filters) if params.filters else [
        min(params.base_filters * 2 ** level, params.max_filters) for level in range(len(strides))]
    return kernels, strides, filters


def _dynunet_problems(params: DynUNetParams, windows: dict[str, Shape3], *,
                      batch_size: int | None = None) -> Iterator[tuple[str, str]]:
    """Problems of a DynUNet planned from ``windows["data.window"]`` with the other windows it will see."""
    window = tuple(int(s) for s in windows["data.window"])
    kernels, strides, filters = dynunet_plan(params, window)
    planned = params.strides is None
    if planned and len(strides) < 3:
        yield "", (f"data.window = {list(window)} is too small for a DynUNet: planned from it (halving sides of "
                   f"at least {2 * params.min_edge}, min_edge = {params.min_edge}), the network has "
                   f"{len(strides) - 1} downsampling(s) and needs at least 2. Use sides of at least "
                   f"{4 * params.min_edge}, a smaller min_edge, or set strides.")
        return
    if planned and params.filters is not None and len(params.filters) != len(strides):
        yield "filters", (f"filters has {len(params.filters)} entries, but the DynUNet planned from data.window = "
                          f"{list(window)} has {len(strides)} levels (strides {[list(s) for s in strides]}). "
                          "Give one per level, or use base_filters/max_filters.")
    if planned and params.deep_supervision > len(strides) - 2:
        yield "deep_supervision", (_too_many_heads(params.deep_supervision, len(strides)) +
                                   f" (planned from data.window = {list(window)})")
    multiples = tuple(math.prod(s[axis] for s in strides) for axis in range(3))
    origin = ", planned from data.window" if planned else ""
    network = f"this DynUNet (strides {[list(s) for s in strides]}{origin})"
    for message in window_problems(windows, multiples, network=network):
        yield "", message
    for shape, shape_key in {tuple(shape): key for key, shape in reversed(windows.items())}.items():
        if shape == multiples and params.norm_name == "instance":
            yield "", (f"{shape_key} = {list(shape)} shrinks to a single voxel at the bottom of this DynUNet, where "
                       "instance norm fails. Use a window twice as large on one axis, one stride fewer, or "
                       'norm_name = "batch".')
    if params.norm_name == "batch" and window == multiples and batch_size == 1:
        yield "norm_name", (f"data.window = {list(window)} shrinks to a single voxel at the bottom of this DynUNet "
                            "and [train] batch_size = 1, so batch norm sees one value per channel there and fails "
                            "at the first training step. Raise batch_size, use a larger window or one stride fewer.")


def check_dynunet(params: DynUNetParams, spec: Any) -> Iterator[tuple[str, str]]:
    """Strides planned from (or given for) data.window that every window is a multiple of; room for the heads."""
    yield from _dynunet_problems(params, spec_windows(spec), batch_size=spec.train.batch_size)


def deep_supervision_weights(heads: int) -> list[float]:
    """nnU-Net's loss weights of the main output and ``heads`` extra heads: 1/2**i, summing to 1."""
    raw = [1 / 2 ** i for i in range(1 + heads)]
    return [w / sum(raw) for w in raw]


@plugin(DynUNetParams, check=check_dynunet)
def monai_dynunet(params: DynUNetParams, *, window, in_channels: int = 1, out_channels: int = 1, **context):
    """DynUNet (MONAI): nnU-Net's UNet, planned from the window, with deep-supervision heads."""
    problems = [(f"model.params.{key}" if key else "model.params", message)
                for key, message in _dynunet_problems(params, {"data.window": tuple(window)})]
    if problems:
        raise UserError(" ".join(f"{key}: {message}" for key, message in problems))
    kernels, strides, filters = dynunet_plan(params, window)
    return _deep_supervised_dynunet()(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
        dropout=params.dropout or None,
        norm_name=("instance", {"affine": True}) if params.norm_name == "instance" else "batch",
        deep_supervision=params.deep_supervision > 0,
        deep_supr_num=max(params.deep_supervision, 1),
        res_block=params.res_block,
    )


@functools.cache
def _deep_supervised_dynunet():
    """MONAI's DynUNet returning the deep-supervision outputs as a list (built on first use: MONAI
    is imported only when a model is built)."""
    from monai.networks.nets import DynUNet

    class DeepSupervisedDynUNet(DynUNet):
        """DynUNet whose training-mode output with deep supervision is ``[main, head1, ...]``, each
        (B, C, D, H, W) at the window's resolution; otherwise (and in eval mode) the main logits.
        ``deep_supervision_weights`` holds the loss weight of each output (one when it is off)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            heads = self.deep_supr_num if self.deep_supervision else 0
            self.deep_supervision_weights: list[float] = deep_supervision_weights(heads)

        def forward(self, x):
            out = super().forward(x)
            if self.training and self.deep_supervision:
                return list(out.unbind(dim=1))  # MONAI stacks them on dim 1
            return out

    DeepSupervisedDynUNet.__module__ = __name__
    return DeepSupervisedDynUNet
