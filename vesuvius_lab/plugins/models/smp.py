"""2.5D models from segmentation-models-pytorch: a 2D UNet / UNet++ reading a window's D slices as
D input channels and predicting D output channels per class (wrapped by :class:`Depth2D`).

Weights are never downloaded: ``encoder_weights`` is None (random initialisation) or the path of
a local file holding the encoder's state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.registry import plugin
from vesuvius_lab.core.contract.windows import spec_windows, window_problems

#: Key prefixes of ImageNet classifier heads, which a segmentation encoder does not have.
CLASSIFIER_HEADS = ("fc.", "_fc.", "classifier.", "head.", "last_linear.")

#: SMP's default decoder widths for a depth-5 encoder; shallower encoders use the last ones.
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class SmpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoder: str = Field("resnet18", description="SMP encoder name (e.g. resnet34, efficientnet-b0, mit_b0, tu-<timm name>).")
    depth: int | None = Field(None, ge=1, description="Slices per window (input channels); None = data.window's first side.")
    encoder_depth: int = Field(5, ge=2, le=5, description="Encoder stages (2-5); H and W must be multiples of 2**encoder_depth.")
    decoder_channels: tuple[int, ...] | None = Field(
        None, description=f"One width per decoder stage; None = the last encoder_depth of {list(DEFAULT_DECODER_CHANNELS)}.")
    decoder_attention_type: Literal["scse"] | None = Field(
        None, description='"scse" adds squeeze-and-excitation attention to every decoder block.')
    encoder_weights: str | None = Field(
        None, description="Path of a local file with the encoder's state dict (never downloaded); None = random init.")

    @field_validator("encoder_weights")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        if value is not None and value.lower() in {"imagenet", "ssl", "swsl", "instagram", "noisy-student", "advprop"}:
            raise ValueError(
                f'"{value}" names weights that would be downloaded; vesuvius-lab never downloads. '
                "Save the encoder's state dict to a file once and give its path, or leave encoder_weights unset.")
        return value

    @field_validator("decoder_channels")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and min(value, default=1) < 1:
            raise ValueError(f"every decoder width must be at least 1, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _decoder_matches_encoder(self):
        if self.decoder_channels is not None and len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(f"decoder_channels has {len(self.decoder_channels)} entries but encoder_depth is "
                             f"{self.encoder_depth}; give one width per encoder stage")
        return self

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        return self.decoder_channels or DEFAULT_DECODER_CHANNELS[-self.encoder_depth:]


#: segmentation-models-pytorch's SCSEModule divides the channels by this (a 0-channel conv below it).
SCSE_REDUCTION = 16


def check_smp(params: SmpParams, spec: Any, architecture: str = "Unet") -> Iterator[tuple[str, str]]:
    """The encoder must exist (and fit the architecture and encoder_depth); the slice count must match
    both windows; H and W must survive the encoder's downsampling."""
    try:
        problem = encoder_problem(params.encoder, architecture, params.encoder_depth)
    except ImportError as exc:
        problem = (f"segmentation-models-pytorch cannot be imported ({exc}), so no encoder can be built. "
                   "Reinstall it (pip install segmentation-models-pytorch).")
    if problem:
        yield "encoder", problem
    train_depth = spec.data.window[0]
    if params.depth is not None and params.depth != train_depth:
        yield "depth", (f"depth = {params.depth} but data.window = {list(spec.data.window)} has {train_depth} "
                        f"slices; a 2.5D model reads every slice of a window as one channel. Remove depth "
                        f"or make it equal to data.window's first side.")
    if spec.inference.window is not None and spec.inference.window[0] != train_depth:
        yield "", (f"inference.window = {list(spec.inference.window)} has {spec.inference.window[0]} slices "
                   f"but the 2.5D model is trained on {train_depth} (data.window); its depth is fixed, so "
                   f"set inference.window's first side to {train_depth}.")
    stride = 2 ** params.encoder_depth
    for message in window_problems(spec_windows(spec), (1, stride, stride),
                                   network=f"a 2D encoder of depth {params.encoder_depth}"):
        yield "", message
    if params.decoder_attention_type == "scse" and min(params.decoder_widths) < SCSE_REDUCTION:
        yield "decoder_channels", (f"scSE attention squeezes channels by {SCSE_REDUCTION}, so every decoder "
                                   f"block needs at least {SCSE_REDUCTION} channels; got "
                                   f"{list(params.decoder_widths)}. Raise the small ones or drop the attention.")
    if params.encoder_weights is not None and not Path(params.encoder_weights).is_file():
        yield "encoder_weights", (f'no file "{params.encoder_weights}" (relative paths are relative to the '
                                  "working directory). Give the path of a saved encoder state dict.")


def _build(architecture: str, params: SmpParams, window, in_channels: int, out_channels: int):
    import segmentation_models_pytorch as smp
    import torch

    from vesuvius_lab.core.contract.models import Depth2D

    if in_channels != 1:
        raise UserError(f"2.5D SMP models read single-channel CT windows; got in_channels={in_channels}.")
    depth = params.depth or int(window[0])
    problem = encoder_problem(params.encoder, architecture, params.encoder_depth)
    if problem:
        raise UserError(f"model.params.encoder: {problem}")
    try:
        net = getattr(smp, architecture)(
            encoder_name=params.encoder,
            encoder_depth=params.encoder_depth,
            encoder_weights=None,
            decoder_channels=params.decoder_widths,
            decoder_attention_type=params.decoder_attention_type,
            in_channels=depth,
            classes=depth * out_channels,
        )
    except ValueError as exc:  # e.g. an encoder this architecture does not support
        raise UserError(f"model.params: segmentation-models-pytorch cannot build {architecture} with these "
                        f"params: {exc}. Choose another encoder or architecture.") from None
    pruned = prune_unused_modules(net, torch.zeros(1, depth, 64, 64))
    if params.encoder_weights is not None:
        encoder_pruned = tuple(name.removeprefix("encoder.") + "." for name in pruned if name.startswith("encoder."))
        load_encoder_weights(net.encoder, params.encoder_weights, ignore=encoder_pruned)
    return Depth2D(net, depth, out_channels)


def prune_unused_modules(net, example) -> list[str]:
    """Replace the submodules whose parameters never get a gradient with :class:`Pruned`
    (parameter-free, passes its input on); return their names.

    An SMP encoder built with encoder_depth < 5 keeps its deeper stages (e.g. ResNet's layer4,
    two thirds of its weights; EfficientNet even runs some of them and drops the result): they
    would be saved, counted, and break DistributedDataParallel, which requires every parameter
    to receive a gradient. One backward pass through a copy of ``net`` shows which parameters
    matter; the copy keeps ``net`` itself untouched and lets this work under no_grad or
    inference_mode too, so a model is pruned the same way for training and for prediction.
    """
    import copy

    import torch

    from vesuvius_lab.core.contract.models import Pruned

    with torch.inference_mode(False), torch.enable_grad():
        probe = copy.deepcopy(net).eval()  # eval: BatchNorm statistics stay as they are
        probe(example.clone()).sum().backward()
    unused = []

    def visit(module, probe_module, prefix: str) -> None:
        for (name, child), probe_child in zip(list(module.named_children()), probe_module.children()):
            grads = [p.grad for p in probe_child.parameters()]
            if grads and all(g is None for g in grads):
                setattr(module, name, Pruned())
                unused.append(prefix + name)
            elif any(g is None for g in grads):
                visit(child, probe_child, f"{prefix}{name}.")

    visit(net, probe, "")
    return unused


#: What each architecture cannot take, as SMP 0.6 refuses it: (encoder name prefix, reason).
ARCHITECTURE_LIMITS = {
    "UnetPlusPlus": (("mit_b", "UNet++'s nested skip paths need a stride-2 feature map, which the Mix "
                                "Transformer (mit_b*) encoders do not have"),),
}


def encoder_problem(name: str, architecture: str = "Unet", encoder_depth: int = 5) -> str | None:
    """Why segmentation-models-pytorch would refuse ``name`` as the encoder of ``architecture`` with
    ``encoder_depth`` stages, or None. Imports SMP (and timm) but builds no network: a ``tu-`` encoder's
    stages are read from a timm feature extractor made on the meta device, as SMP itself does."""
    import segmentation_models_pytorch.encoders as smp_encoders

    from vesuvius_lab.core.registry import suggest

    version = _smp_version()
    equivalent = getattr(smp_encoders, "is_equivalent_to_timm_universal", None)
    if name.startswith("timm-") and equivalent is not None and equivalent(name):
        # SMP renames these deprecated names to timm universal encoders (get_encoder does the same).
        timm_name = name.replace("timm-", "tu-")
        name = timm_name.replace("tu-", "tu-tf_") if "mobilenetv3" in timm_name else timm_name
    if name.startswith("tu-"):
        return _timm_encoder_problem(name[3:], encoder_depth)
    known = list(getattr(smp_encoders, "encoders", None) or smp_encoders.get_encoder_names())
    if name not in known:
        return (f'"{name}" is not an encoder segmentation-models-pytorch {version} knows.{suggest(name, known)} '
                "Use a name from segmentation_models_pytorch.encoders.get_encoder_names() (e.g. resnet34, "
                'efficientnet-b0, mit_b0), or "tu-<timm model>" for a timm model.')
    for prefix, reason in ARCHITECTURE_LIMITS.get(architecture, ()):
        if name.startswith(prefix):
            return (f'segmentation-models-pytorch {version} cannot build {architecture} with the encoder "{name}": '
                    f"{reason}. Choose another encoder (e.g. resnet34) or the smp_unet25d model.")
    return None


def _smp_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("segmentation-models-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _timm_encoder_problem(model: str, encoder_depth: int) -> str | None:
    """Why SMP cannot use the timm model ``model`` (a "tu-" encoder without the prefix), or None."""
    import timm

    arch, _, tag = model.partition(".")
    if not timm.is_model(model):
        close = _suggest_encoder(arch, timm.list_models()) if arch else ""
        return (f'timm {timm.__version__} has no model "{arch}" (encoder "tu-{model}").{close} Use '
                '"tu-<name>" with a name from timm.list_models(), e.g. "tu-resnet34".')
    if tag:
        tagged = timm.list_models(f"{arch}.*", include_tags=True)
        if model not in tagged:
            return (f'timm {timm.__version__} has no tag "{tag}" for the model "{arch}" (encoder "tu-{model}").'
                    f"{_suggest_encoder(model, tagged)} The tag only names pretrained "
                    f'weights, which are never downloaded here: "tu-{arch}" builds the same network.')
    return _timm_stage_problem(model, encoder_depth)


def _suggest_encoder(timm_name: str, timm_names: list[str]) -> str:
    """' Did you mean "tu-x"?' for the closest timm model name, or ''."""
    from vesuvius_lab.core.registry import suggest

    return suggest(timm_name, timm_names).replace('"', '"tu-', 1)


def _timm_stage_problem(model: str, encoder_depth: int) -> str | None:
    """SMP's timm encoder made on the meta device (no memory, no weights): a ValueError or IndexError
    there is SMP refusing the model's stages (e.g. a ViT, whose feature maps all have stride 16, or
    fewer stages than encoder_depth). When timm cannot make the model on the meta device at all, the
    answer is not cheap, and the check is skipped (the build reports it)."""
    import warnings

    import timm
    import torch
    from segmentation_models_pytorch.encoders import TimmUniversalEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                timm.create_model(model, features_only=True)
        except Exception as exc:
            if "features_only" in str(exc):
                return (f'the timm model "{model}" cannot give feature maps (features_only), so it cannot be '
                        "an encoder. Choose another timm model, e.g. \"tu-resnet34\".")
            return None
        try:
            with torch.device("meta"):
                TimmUniversalEncoder(name=model, pretrained=False, in_channels=1, depth=encoder_depth)
        except (ValueError, IndexError, RuntimeError, AssertionError) as exc:
            if "meta" in str(exc).lower():  # a limit of the meta device, not SMP refusing the model
                return None
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".") + "."
            return (f'segmentation-models-pytorch cannot use the timm model "{model}" as an encoder of depth '
                    f"{encoder_depth}: {detail} A UNet encoder needs feature maps at strides 2, 4, 8, ... (or "
                    "4, 8, ... for transformers); choose a convolutional or hierarchical timm model (e.g. "
                    '"tu-resnet34", "tu-convnext_tiny") or a smaller encoder_depth.')
    return None


def load_encoder_weights(encoder, path: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Load a local state dict into an SMP encoder.

    Accepts the encoder's own state dict, a whole SMP or vesuvius-lab model's (its encoder
    entries are used), or a checkpoint dict holding either under ``state_dict`` / ``model``.
    Classifier-head entries are ignored. A first convolution saved for another number of input
    channels (e.g. 3 for RGB ImageNet weights) is adapted: its kernel is summed over the input
    channels and shared evenly by the D slices, so a window of identical slices gives the response
    the original gave to a grey image. Entries under the ``ignore`` prefixes (stages that were
    pruned as unused) are skipped.
    """
    import torch

    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f'encoder_weights: no file "{path}". Give the path of a saved encoder state dict.') from None
    except Exception as exc:
        raise UserError(f'encoder_weights: "{path}" is not a readable torch state dict ({type(exc).__name__}: '
                        f"{exc}). Save it with torch.save(model.encoder.state_dict(), path).") from None
    state = {key: value for key, value in _unwrap_state_dict(loaded, path).items() if not key.startswith(ignore)}
    own = encoder.state_dict()
    first_conv = next(key for key, value in own.items() if value.ndim == 4)
    for key, value in list(state.items()):
        if key in own and value.shape != own[key].shape:
            if key != first_conv:
                raise UserError(f'encoder_weights: "{path}" entry {key} has shape {tuple(value.shape)} but the '
                                f"encoder needs {tuple(own[key].shape)}. Save the state dict of the same encoder.")
            state[key] = _adapt_first_conv(key, value, own[key].shape, path)
    missing = [key for key in own if key not in state]
    extra = [key for key in state if key not in own and not key.startswith(CLASSIFIER_HEADS)]
    if missing or extra:
        raise UserError(
            f'encoder_weights: "{path}" does not fit this encoder: {len(missing)} of its {len(own)} entries '
            f"are missing and {len(extra)} in the file are unknown to it (e.g. {', '.join((missing + extra)[:3])}). "
            "Save the state dict of the same encoder (model.encoder.state_dict()).")
    encoder.load_state_dict({key: state[key] for key in own}, strict=True)


def _unwrap_state_dict(loaded: Any, path: Path) -> dict:
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise UserError(f'encoder_weights: "{path}" holds a {type(loaded).__name__}, not a state dict.')
    # DDP ("module.") and Depth2D ("net2d.") wrappers prefix the keys of a whole trained model.
    state = {key.removeprefix("module.").removeprefix("net2d."): value for key, value in loaded.items()}
    if any(key.startswith("encoder.") for key in state):
        state = {key.removeprefix("encoder."): value for key, value in state.items() if key.startswith("encoder.")}
    return state


def _adapt_first_conv(key: str, weight, shape, path: Path):
    """A first-conv kernel saved for another number of input channels, spread evenly over ``shape[1]``."""
    if weight.ndim != 4 or weight.shape[0] != shape[0] or weight.shape[2:] != shape[2:]:
        raise UserError(f'encoder_weights: "{path}" entry {key} has shape {tuple(weight.shape)} but the encoder '
                        f"needs {tuple(shape)}. Save the state dict of the same encoder.")
    return (weight.sum(1, keepdim=True) / shape[1]).expand(*shape).clone()


def check_unet25d(params: SmpParams, spec: Any) -> Iterator[tuple[str, str]]:
    return check_smp(params, spec, "Unet")


def check_unetpp25d(params: SmpParams, spec: Any) -> Iterator[tuple[str, str]]:
    return check_smp(params, spec, "UnetPlusPlus")


@plugin(SmpParams, check=check_unet25d)
def smp_unet25d(params: SmpParams, *, window, in_channels: int = 1, out_channels: int = 1, **context):
    """2.5D UNet (segmentation-models-pytorch): the window's slices are the 2D net's channels."""
    return _build("Unet", params, window, in_channels, out_channels)


@plugin(SmpParams, check=check_unetpp25d)
def smp_unetpp25d(params: SmpParams, *, window, in_channels: int = 1, out_channels: int = 1, **context):
    """2.5D UNet++ (segmentation-models-pytorch): nested dense skip paths, heavier decoder."""
    return _build("UnetPlusPlus", params, window, in_channels, out_channels)
