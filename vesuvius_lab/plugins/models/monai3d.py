"""3D models from MONAI: SwinUNETR, UNet and SegResNet, taking (B, 1, D, H, W) windows directly.

Each plugin's ``check`` tells ``vlab validate`` which windows the network cannot take (and the
nearest ones it can), using arithmetic only, so validation never imports MONAI.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.registry import plugin
from vesuvius_lab.core.windows import spec_windows, window_problems


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
