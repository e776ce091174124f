"""Sliding-window inference: tiling, batching, blending, test-time augmentation, 2.5D axes.

Predicting a volume patch by patch leaves seams where patches meet, because a network is least
sure near the edges of what it sees. This engine predicts overlapping windows and blends them
with a weight map (a *blender* plugin) that trusts window centres more than window edges.

The API
-------
``sliding_window(volume, predictor, *, window, overlap, blender="gaussian", blender_params=None,
batch_size=4, tta=(), axes=(0,), scale=1.0, device=None, progress=False)``
    returns a float32 numpy array (C, D, H, W): the blend of what ``predictor`` returns (logits,
    probabilities, anything per voxel; the engine does not interpret it, as MONAI's
    ``sliding_window_inference`` does not).

    - ``volume``: (D, H, W) numpy array or torch tensor, any numeric dtype. It stays in its dtype
      on the device; each batch of windows is converted to float32 and multiplied by ``scale``.
      Nothing else is done to intensities: a uint8 volume reaches the predictor as 0..255 unless
      ``scale=1/255`` is given (models in this project expect [0, 1]; :func:`predict_volume`
      does this for you).
    - ``predictor``: maps a float32 tensor (B, 1, d, h, w) to (B, C, d, h, w) on the same
      device; B <= ``batch_size``. Called under ``torch.inference_mode()``; a ``torch.nn.Module``
      is used in whatever mode it is in (call ``.eval()`` first, or use :func:`predict_volume`).
      Wrap the call in ``torch.autocast`` for mixed precision; accumulation stays float32.
    - ``window``: (d, h, w) in the predictor's frame. ``overlap``: a fraction in [0, 1), one for
      all axes or one per axis. Windows start every ``max(1, int(side * (1 - overlap)))`` voxels
      (MONAI's rule) and the last one is moved back to end flush with the far edge. Along an axis
      shorter than the window the volume is zero-padded (the deficit split as MONAI splits it,
      the smaller half first) and the result cropped back.
    - ``blender``: a plugin name of the group ``vesuvius_lab.blenders`` (``mean``, ``gaussian``,
      ``ramp``, ``center``, or a third party's), built with ``blender_params`` and
      ``window=...``. Each voxel gets ``sum(weight * prediction) / sum(weight)`` over the
      windows covering it. The weight map is built once per (blender, params, window, device)
      and cached for the process.
    - ``tta``: any of ``flip0``, ``flip1``, ``flip2`` (flip along that axis of the window,
      (d, h, w)) and ``rot90`` (rotations of the (h, w) plane by 90, 180 and 270 degrees; needs
      h == w). The variants are the identity plus each listed transform on its own (not all
      their combinations, unlike nnU-Net's mirroring): ``("flip0", "flip1", "flip2")`` costs 4
      predictor calls per batch, ``rot90`` 3 more. Each output is mapped back to the original
      orientation and the variants are averaged before blending.
    - ``axes``: for 2.5D models that see a few slices along their depth axis, predict with each
      listed volume axis as the depth axis in turn (the volume is transposed so that axis comes
      first, the window keeps its meaning in the predictor's frame) and average the per-axis
      results with equal weight. ``(0,)`` is the plain prediction; ``(0, 1, 2)`` runs every way,
      which suits scroll sheets that run in any direction.
    - ``device``: where windows and accumulators live; default the predictor's parameters'
      device if it is a module, else the volume's if it is a tensor, else the CPU.
    - Memory: the volume (in its own dtype), a float32 weighted sum (C, D, H, W) and weight sum
      (D, H, W), one batch of windows and its outputs; with several ``axes`` one more
      (C, D, H, W) float32 for the running average.

``predict_volume(volume, predictor, inference, *, window=None, axes=None, device=None,
progress=False)``
    surface probabilities, float32 (D, H, W), for a uint8 (or already scaled float) volume and
    a model that returns logits with 1 channel (sigmoid) or 2 channels (softmax, channel 1 =
    surface), using an :class:`~vesuvius_lab.core.config.spec.InferenceSpec`. Windows are turned into
    probabilities before blending: averaging probabilities is bounded whatever the logits, and
    only one channel is accumulated.

Window layout helpers: :func:`window_starts`, :func:`tile`, :func:`padding`; the cached weight
map: :func:`weight_map`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from vesuvius_lab.core.config.spec import InferenceSpec
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.registry import build, suggest

if TYPE_CHECKING:  # torch is imported where it is used, so importing this module stays cheap
    import torch

Shape3 = tuple[int, int, int]
Slices3 = tuple[slice, slice, slice]
Predictor = Callable[["torch.Tensor"], "torch.Tensor"]
TTA_NAMES = ("flip0", "flip1", "flip2", "rot90")


# --- window layout -------------------------------------------------------------------------------

def window_starts(size: int, side: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis of length ``size >= side``; the last ends at ``size``."""
    if side >= size:
        return [0]
    step = max(1, int(side * (1 - overlap)))  # MONAI's rule, so windows land where MONAI's do
    count = next(i for i in range(size) if i * step + side >= size) + 1
    return [min(i * step, size - side) for i in range(count)]


def tile(shape: Sequence[int], window: Sequence[int], overlap: Sequence[float]) -> list[Slices3]:
    """The windows covering a (padded) volume of ``shape``, in C order (last axis fastest)."""
    starts = [window_starts(n, w, o) for n, w, o in zip(shape, window, overlap)]
    return [tuple(slice(s, s + w) for s, w in zip(corner, window))  # type: ignore[misc]
            for corner in itertools.product(*starts)]


def padding(shape: Sequence[int], window: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding per axis that makes ``shape`` at least ``window``."""
    return [(max(w - n, 0) // 2, max(w - n, 0) - max(w - n, 0) // 2) for n, w in zip(shape, window)]


# --- weight maps ---------------------------------------------------------------------------------

def _params_key(params: Any) -> str:
    if params is None:
        return "{}"
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    return json.dumps(params, sort_keys=True, default=str)


@lru_cache(maxsize=32)
def _weight_map(blender: str, params_key: str, window: Shape3, device: str) -> "torch.Tensor":
    import torch
    from pydantic import ValidationError

    try:
        weights = np.asarray(build("blenders", blender, json.loads(params_key), window=window))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        raise UserError(f'Invalid params {params_key} for the blender "{blender}": {problems}. '
                        f"`vlab plugins show blenders {blender}` lists its params.") from exc
    if weights.shape != window or not np.isfinite(weights).all() or not (weights > 0).all():
        raise UserError(
            f'The blender "{blender}" returned a weight map of shape {weights.shape} with values in '
            f"[{weights.min() if weights.size else 'none'}, {weights.max() if weights.size else 'none'}] "
            f"for the window {window}; a blender must return the window's shape with every weight "
            "finite and strictly positive. Fix the plugin or choose another blender."
        )
    return torch.from_numpy(weights.astype(np.float32)).to(device)


def weight_map(blender: str, params: Any, window: Sequence[int], device: Any = "cpu") -> "torch.Tensor":
    """The blender's float32 weight map as a tensor on ``device``; built once, then cached (do not modify it)."""
    return _weight_map(blender, _params_key(params), tuple(int(s) for s in window), str(device))


def weight_map_cache_info():
    """Hits and misses of the weight-map cache (a ``functools`` cache-info tuple)."""
    return _weight_map.cache_info()


def clear_weight_maps() -> None:
    _weight_map.cache_clear()


# --- argument checks -----------------------------------------------------------------------------

def _check_window(window: Sequence[int]) -> Shape3:
    if len(window) != 3 or any(int(s) != s or s < 1 for s in window):
        raise UserError(f"The inference window must be three positive whole numbers (d, h, w); got {tuple(window)}.")
    return tuple(int(s) for s in window)  # type: ignore[return-value]


def _check_overlap(overlap: float | Sequence[float]) -> tuple[float, float, float]:
    values = tuple(overlap) if isinstance(overlap, (tuple, list)) else (overlap,) * 3
    if len(values) != 3 or any(not 0 <= float(v) < 1 for v in values):
        raise UserError(
            f"The inference overlap must be a fraction in [0, 1), one value or one per axis; got {overlap}.")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _check_tta(tta: Sequence[str], window: Shape3) -> list[str]:
    chosen = list(dict.fromkeys(tta))
    for name in chosen:
        if name not in TTA_NAMES:
            raise UserError(f'Unknown test-time augmentation "{name}".{suggest(name, TTA_NAMES)} '
                            f"Choose among {', '.join(TTA_NAMES)}.")
    if "rot90" in chosen and window[1] != window[2]:
        raise UserError(
            f"Test-time augmentation rot90 rotates the (h, w) plane of each window, which needs a square "
            f"plane, but the window is {window}. Make h equal w in [inference] window, or drop rot90.")
    return chosen


def _check_axes(axes: Sequence[int]) -> tuple[int, ...]:
    axes = tuple(axes)
    if not axes or len(set(axes)) != len(axes) or any(a not in (0, 1, 2) for a in axes):
        raise UserError(f"Prediction axes must be distinct values among 0, 1, 2 (the depth axis of each pass); "
                        f"got {axes}.")
    return axes


def _check_output(out: Any, batch: int, window: Shape3) -> None:
    import torch

    if not isinstance(out, torch.Tensor) or out.ndim != 5 or out.shape[0] != batch or tuple(out.shape[2:]) != window:
        shape = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise UserError(
            f"The model returned {shape} for a batch of windows of shape {(batch, 1, *window)}; a model must "
            "return a tensor (B, C, d, h, w) with the window's spatial shape. Check the model plugin, or "
            "choose a window the model accepts.")


# --- volume and device ---------------------------------------------------------------------------

def _default_device(predictor: Predictor, volume: Any) -> "torch.device":
    import torch

    if isinstance(predictor, torch.nn.Module):
        for tensor in [*predictor.parameters(), *predictor.buffers()]:
            return tensor.device
    return volume.device if isinstance(volume, torch.Tensor) else torch.device("cpu")


def _as_tensor(volume: Any, device: "torch.device") -> "torch.Tensor":
    """The volume as a tensor on ``device`` in its own dtype (converted only if torch lacks it)."""
    import torch

    if not isinstance(volume, torch.Tensor):
        volume = np.asarray(volume)
        if volume.dtype.kind not in "biuf":
            raise UserError(f"Cannot predict a volume of dtype {volume.dtype}; give numbers (uint8 or float).")
        if volume.dtype.kind == "u" and volume.dtype.itemsize > 1:
            volume = volume.astype(np.float32)  # torch lacks most unsigned types
        elif not volume.flags.writeable:
            volume = volume.copy()  # torch warns on read-only memory (a memory map, a broadcast)
        volume = torch.from_numpy(volume)
    if volume.ndim != 3:
        raise UserError(f"A volume to predict must be 3D (D, H, W); got shape {tuple(volume.shape)}.")
    return volume.to(device)


# --- test-time augmentation ----------------------------------------------------------------------

def _tta_variants(tta: Sequence[str]) -> list[tuple[Callable, Callable]]:
    """(transform, inverse) pairs on (B, C, d, h, w) tensors: the identity, then each listed transform."""
    import torch

    def flip(dim: int):
        return lambda x: torch.flip(x, dims=(dim,))

    def rotate(k: int):
        return lambda x: torch.rot90(x, k, dims=(3, 4))

    variants: list[tuple[Callable, Callable]] = [(lambda x: x, lambda x: x)]
    for name in tta:
        if name == "rot90":
            variants += [(rotate(k), rotate(-k)) for k in (1, 2, 3)]
        else:
            variants.append((flip(2 + int(name[-1])), flip(2 + int(name[-1]))))
    return variants


def _predict_batch(predictor: Predictor, batch: "torch.Tensor", variants, window: Shape3) -> "torch.Tensor":
    """The predictor's output for ``batch``, averaged over the TTA variants, as float32."""
    import torch

    total = None
    for transform, inverse in variants:
        out = predictor(transform(batch))
        # rot90 by 90/270 swaps h and w, which are equal (checked), so the shape check holds.
        _check_output(out, batch.shape[0], window)
        out = inverse(out)
        if total is None:
            # A copy when it will be summed into: the output may alias the input or a model buffer.
            total = out.to(torch.float32, copy=len(variants) > 1)
        else:
            total.add_(out)
    if len(variants) > 1:
        total /= len(variants)
    return total


# --- the engine ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over batches (yields the function that advances it), or nothing."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("batches", total=total)
        yield lambda: bar.advance(task)


def _batches(windows: list[Slices3], batch_size: int) -> Iterator[list[Slices3]]:
    for start in range(0, len(windows), batch_size):
        yield windows[start:start + batch_size]


def _accumulate(volume: "torch.Tensor", windows: list[Slices3], predictor: Predictor, *, window: Shape3,
                weights: "torch.Tensor", batch_size: int, variants, scale: float,
                advance: Callable[[], None]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The weighted sum (C, *volume.shape) of the predictions of ``windows`` (slices of ``volume``, in C order)
    and the sum of their weights. Block-wise prediction calls it with the windows that touch a block, in the
    same order, so every voxel sums the same terms in the same order as over the whole volume."""
    import torch

    weight_sum = torch.zeros(volume.shape, dtype=torch.float32, device=volume.device)
    for where in windows:
        weight_sum[where] += weights
    batch = torch.empty((batch_size, 1, *window), dtype=torch.float32, device=volume.device)
    blended = None
    for group in _batches(windows, batch_size):
        for i, where in enumerate(group):
            batch[i, 0].copy_(volume[where])
        inputs = batch[:len(group)]
        if scale != 1:
            inputs.mul_(scale)
        outputs = _predict_batch(predictor, inputs, variants, window)
        if blended is None:
            blended = torch.zeros((outputs.shape[1], *volume.shape), dtype=torch.float32, device=volume.device)
        for output, where in zip(outputs, group):
            blended[(slice(None), *where)].addcmul_(output, weights)
        advance()
    return blended, weight_sum


def _blend_one_axis(volume: "torch.Tensor", predictor: Predictor, *, window: Shape3,
                    overlap: tuple[float, float, float], weights: "torch.Tensor", batch_size: int,
                    variants, scale: float, advance: Callable[[], None]) -> "torch.Tensor":
    """Blended predictions (C, D, H, W) float32 of a (D, H, W) volume whose depth axis is axis 0."""
    pads = padding(volume.shape, window)
    if any(before or after for before, after in pads):
        padded = volume.new_zeros([n + before + after for n, (before, after) in zip(volume.shape, pads)])
        padded[tuple(slice(before, before + n) for n, (before, _) in zip(volume.shape, pads))] = volume
        volume = padded
    blended, weight_sum = _accumulate(volume, tile(volume.shape, window, overlap), predictor, window=window,
                                      weights=weights, batch_size=batch_size, variants=variants, scale=scale,
                                      advance=advance)
    blended /= weight_sum
    del weight_sum
    return blended[(slice(None), *(slice(before, n - after) for n, (before, after) in zip(volume.shape, pads)))]


def _batch_count(shape: Sequence[int], window: Shape3, overlap, batch_size: int) -> int:
    padded = [n + before + after for n, (before, after) in zip(shape, padding(shape, window))]
    return math.ceil(len(tile(padded, window, overlap)) / batch_size)


def sliding_window(volume: Any, predictor: Predictor, *, window: Sequence[int],
                   overlap: float | Sequence[float], blender: str = "gaussian", blender_params: Any = None,
                   batch_size: int = 4, tta: Sequence[str] = (), axes: Sequence[int] = (0,),
                   scale: float = 1.0, device: Any = None, progress: bool = False) -> np.ndarray:
    """Blend ``predictor`` over overlapping windows of a (D, H, W) volume; float32 (C, D, H, W).

    See the module documentation for every argument.
    """
    import torch

    window = _check_window(window)
    overlap = _check_overlap(overlap)
    variants = _tta_variants(_check_tta(tta, window))
    axes = _check_axes(axes)
    if batch_size < 1:
        raise UserError(f"The inference batch size must be at least 1; got {batch_size}.")
    device = torch.device(device) if device is not None else _default_device(predictor, volume)
    weights = weight_map(blender, blender_params, window, device)

    with torch.inference_mode():
        volume = _as_tensor(volume, device)
        # Axis a becomes the depth axis: move it first, keep the other two in order.
        orders = {axis: (axis, *(a for a in range(3) if a != axis)) for axis in axes}
        total = sum(_batch_count([volume.shape[a] for a in orders[axis]], window, overlap, batch_size)
                    for axis in axes)
        average = None
        with _progress(progress, total) as advance:
            for axis in axes:
                order = orders[axis]
                result = _blend_one_axis(volume.permute(order), predictor, window=window, overlap=overlap,
                                         weights=weights, batch_size=batch_size, variants=variants,
                                         scale=scale, advance=advance)
                result = result.permute(0, *(1 + order.index(a) for a in range(3)))  # back to (C, D, H, W)
                if average is None:
                    average = result
                else:
                    average += result
                del result
        if len(axes) > 1:
            average /= len(axes)
        return average.contiguous().cpu().numpy()


@contextlib.contextmanager
def _eval_mode(predictor: Predictor) -> Iterator[None]:
    """A module predicts in eval mode (no dropout, running norm statistics); its mode is restored."""
    import torch

    if not isinstance(predictor, torch.nn.Module):
        yield
        return
    was_training = predictor.training
    predictor.eval()
    try:
        yield
    finally:
        predictor.train(was_training)


def _probabilities(predictor: Predictor) -> Predictor:
    """Wrap a logits predictor: 1 channel -> sigmoid, 2 channels -> softmax channel 1 (surface)."""
    import torch

    def predict(windows: torch.Tensor) -> torch.Tensor:
        logits = predictor(windows)
        if isinstance(logits, torch.Tensor) and logits.ndim == 5 and logits.shape[1] == 1:
            return torch.sigmoid(logits.float())
        if isinstance(logits, torch.Tensor) and logits.ndim == 5 and logits.shape[1] == 2:
            return torch.softmax(logits.float(), dim=1)[:, 1:2]
        shape = tuple(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
        raise UserError(f"The model returned {shape}; surface prediction needs logits (B, 1, d, h, w) for a "
                        "sigmoid or (B, 2, d, h, w) for a softmax whose channel 1 is the surface.")

    return predict


def predict_volume(volume: Any, predictor: Predictor, inference: "InferenceSpec", *,
                   window: Sequence[int] | None = None, axes: Sequence[int] | None = None,
                   device: Any = None, progress: bool = False) -> np.ndarray:
    """Surface probabilities, float32 (D, H, W), for a uint8 volume and a logits model, as ``inference`` says.

    ``window`` overrides ``inference.window`` (pass the experiment's ``inference_window`` when that
    is None); ``axes`` defaults to ``inference.axes`` when the spec has it, else ``(0,)``.
    A float volume is taken as already scaled to [0, 1].
    """
    window = window or inference.window
    if window is None:
        raise ValueError("predict_volume needs a window: inference.window is None and none was passed")
    dtype = str(volume.dtype).removeprefix("torch.")
    if dtype == "uint8":
        scale = 1 / 255
    elif dtype in ("float16", "bfloat16", "float32", "float64"):
        scale = 1.0
    else:
        raise UserError(f"Volumes to predict are uint8 CT (or floats already scaled to [0, 1]); got {dtype}.")
    with _eval_mode(predictor):
        blended = sliding_window(
            volume, _probabilities(predictor), window=window, overlap=inference.overlap,
            blender=inference.blend.plugin, blender_params=inference.blend.params,
            batch_size=inference.batch_size, tta=inference.tta,
            axes=axes if axes is not None else getattr(inference, "axes", (0,)),
            scale=scale, device=device if device is not None else _default_device(predictor, volume),
            progress=progress)
    return blended[0]
