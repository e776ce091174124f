"""The post-processing chain: an experiment's ``[[postprocess]]`` steps, applied in the order written.

A chain turns surface probabilities into a uint8 {0, 1} mask. Each step is a postprocessors
plugin (see :mod:`vesuvius_lab.plugins.postprocess`); if the last step still returns
probabilities, the chain thresholds them at the experiment's ``[inference] threshold``.
:meth:`Chain.apply_steps` also returns the mask after the threshold alone and after every step,
so a run can score each step and reports can show what each one added.

:func:`postprocess_folder` applies a chain to prediction TIFFs (``vlab postprocess``). The rule
for reading them: float16/float32/float64 voxels are probabilities in [0, 1] (the project saves
probabilities as float16); uint8 voxels are a mask of 0 and 1, unless the caller says they are
probabilities scaled to 0-255 (``--uint8-probabilities``; p = value / 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from vesuvius_lab.core import interrupts, registry
from vesuvius_lab.core.config.spec import PluginRef
from vesuvius_lab.core.data.tiff import read_tiff, write_volume
from vesuvius_lab.core.errors import UserError

#: The label of the first entry of :meth:`Chain.apply_steps`: the plain threshold, before any step.
THRESHOLD_LABEL = "threshold"


@dataclass(frozen=True)
class ChainStep:
    label: str  # unique within the chain: the plugin name, then "name#2", "name#3", ...
    ref: PluginRef
    apply: Callable[[np.ndarray], np.ndarray]


def is_probabilities(volume: np.ndarray) -> bool:
    """Float volumes are probabilities; integer and bool volumes are masks."""
    return np.issubdtype(volume.dtype, np.floating)


def to_mask(volume: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 {0, 1}: probabilities (float) above ``threshold``, or the nonzero voxels of a mask."""
    if is_probabilities(volume):
        return (volume > threshold).astype(np.uint8)
    return (volume != 0).astype(np.uint8)


def step_labels(names: Iterable[str]) -> list[str]:
    """Unique labels for steps: the plugin name, "#2", "#3"... for repeats ("threshold" is taken)."""
    seen = {THRESHOLD_LABEL: 1}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


@dataclass(frozen=True)
class Chain:
    steps: tuple[ChainStep, ...]
    threshold: float

    @property
    def labels(self) -> list[str]:
        """The labels :meth:`apply_steps` returns, in order: "threshold", then one per step."""
        return [THRESHOLD_LABEL, *(step.label for step in self.steps)]

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """Run every step on probabilities (or a mask); return the final uint8 {0, 1} mask."""
        for step in self.steps:
            volume = self._run(step, volume)
        return to_mask(volume, self.threshold)

    def apply_steps(self, volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """[(label, uint8 mask)]: the mask after the threshold alone, then after each step."""
        results = [(THRESHOLD_LABEL, to_mask(volume, self.threshold))]
        for step in self.steps:
            volume = self._run(step, volume)
            results.append((step.label, to_mask(volume, self.threshold)))
        return results

    @staticmethod
    def _run(step: ChainStep, volume: np.ndarray) -> np.ndarray:
        result = np.asarray(step.apply(volume))
        if result.shape != volume.shape:
            raise ValueError(f'post-processing step "{step.label}" returned shape {result.shape} for a '
                             f"volume of shape {volume.shape}; a step must keep the shape.")
        return result


def build_chain(steps: Iterable[PluginRef | dict[str, Any]], *, threshold: float, device: str = "cpu",
                runs_dir: Path | None = None) -> Chain:
    """Build each step's plugin with the context (device, runs_dir, threshold); nothing runs yet."""
    refs = [step if isinstance(step, PluginRef) else PluginRef.model_validate(step) for step in steps]
    built = tuple(
        ChainStep(label, ref, registry.build("postprocessors", ref.plugin, ref.params, device=device,
                                             runs_dir=runs_dir, threshold=threshold))
        for label, ref in zip(step_labels(ref.plugin for ref in refs), refs))
    return Chain(built, threshold)


# --------------------------------------------------------------------------- files


PREDICTION_SUFFIXES = (".tif", ".tiff")
#: The voxel types a prediction file may have: probabilities (floats) or a mask (uint8, bool).
PREDICTION_DTYPES = (np.float16, np.float32, np.float64, np.uint8, np.bool_)


def read_prediction(path: Path, *, uint8_probabilities: bool = False) -> np.ndarray:
    """Read a probability or mask TIFF by the rule of ``vlab postprocess``; raise a UserError otherwise.

    float16/float32/float64: probabilities in [0, 1] (the project writes float16). uint8 or bool:
    a mask with values 0 and 1, or with ``uint8_probabilities``, probabilities scaled to 0-255.
    """
    volume = read_tiff(path)
    if volume.ndim != 3:
        raise UserError(f"{path}: expected a 3D volume (D, H, W), found shape {volume.shape}. Save each "
                        "prediction as one multi-page TIFF with one page per slice.")
    if is_probabilities(volume):
        low, high = float(np.nanmin(volume)), float(np.nanmax(volume))
        if np.isnan(volume).any() or low < 0 or high > 1:
            raise UserError(f"{path}: float voxels are read as probabilities, which must lie in [0, 1], but "
                            f"these lie in [{low}, {high}]{' and include NaN' if np.isnan(volume).any() else ''}. "
                            "Apply a sigmoid (or softmax) to logits before saving.")
        return volume.astype(np.float32, copy=False)
    if volume.dtype == np.bool_:
        return volume.astype(np.uint8)
    if volume.dtype != np.uint8:
        raise UserError(f"{path}: voxels of type {volume.dtype} are neither probabilities (float16/float32 "
                        "in [0, 1]) nor a mask (uint8 0/1). Convert the file to one of those.")
    if uint8_probabilities:
        return volume.astype(np.float32) / np.float32(255)
    if volume.max() > 1:
        raise UserError(f"{path}: a uint8 file is read as a mask of 0 and 1, but this one holds values up to "
                        f"{int(volume.max())}. If it holds probabilities scaled to 0-255 (or a 0/255 mask), "
                        "pass --uint8-probabilities.")
    return volume


def prediction_files(folder: Path) -> list[Path]:
    """The ``*.tif``/``*.tiff`` files of a folder, sorted; a UserError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder. Pass the folder holding the prediction TIFFs to --input.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PREDICTION_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no .tif or .tiff files found. Pass the folder holding the predictions "
                        "(one multi-page TIFF per volume).")
    return files


def postprocess_folder(chain: Chain, input_dir: Path, output_dir: Path, *, uint8_probabilities: bool = False,
                       progress: bool = True) -> list[Path]:
    """Apply ``chain`` to every prediction TIFF of ``input_dir``; write uint8 masks of the same names.
    A stop signal stops after the volume in progress: every mask written is whole."""
    files = prediction_files(input_dir)
    if Path(output_dir).resolve() == Path(input_dir).resolve():
        raise UserError(f"{output_dir}: the output folder is the input folder; the masks would replace the "
                        "predictions. Choose another --output folder.")
    written = []
    with interrupts.stop_signals(at="after this volume"):
        for path in _track(files, "post-processing", progress):
            interrupts.check()
            target = Path(output_dir) / path.name
            try:
                prediction = read_prediction(path, uint8_probabilities=uint8_probabilities)
            except UserError as exc:  # say what was written and what was not
                raise UserError(f"{exc}\n{partial_work(written, files, path)}") from None
            write_volume(target, chain.apply(prediction))
            written.append(target)
    return written


def partial_work(written: list[Path], files: list[Path], stopped_at: Path) -> str:
    """What a command over a folder that stopped at ``stopped_at`` wrote, and what it did not."""
    left = files[files.index(stopped_at):]
    done = ", ".join(p.name for p in written) if written else "none"
    return (f"Stopped at {stopped_at.name}: {len(written)} of {len(files)} mask(s) written ({done}); not written: "
            f"{', '.join(p.name for p in left)}. Fix or remove that file and run the command again.")


def _track(items: list, label: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=label, transient=True)
