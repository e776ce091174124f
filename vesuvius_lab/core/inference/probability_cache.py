"""A run's surface probabilities kept on disk, so that an ensemble predicts each member once per volume.

Layout, inside the member's run directory::

    probabilities/<inference key>/<volume key>.npy      float16 (D, H, W)

The *inference key* hashes what shapes the probabilities: the member's effective ``[inference]``
(window, overlap, blending, TTA, axes; not the threshold or the batch size), the checkpoint
used and the stamp of the run's ``summary.json`` (rewritten when a run is resumed and finishes
again). Changing any of them predicts afresh into a new folder. The *volume key* hashes the
volume's voxels and shape, so a volume hits the cache whatever its file name or folder, whether
it comes from ``vlab ensemble`` (validation volumes) or ``vlab predict``/``vlab submit`` (test
volumes). Entries are written atomically with a checksum beside them and verified when read
(:mod:`vesuvius_lab.core.data.array_cache`; values must be finite and in [0, 1]): a damaged entry is
predicted again. Delete ``probabilities/`` to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import ValidationError

from vesuvius_lab.core.config.spec import Experiment, InferenceSpec
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.data.array_cache import probabilities_problem, read_array, write_array
from vesuvius_lab.core.runs.folder import Run

CACHE_FOLDER = "probabilities"
#: [inference] keys that do not change the probabilities, so they stay out of the key.
NOT_IN_KEY = ("threshold", "batch_size")


def volume_key(volume: np.ndarray) -> str:
    """A hash of the voxels and the shape: the same volume gets the same key wherever it is read from."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{volume.dtype.str}{tuple(volume.shape)}".encode())
    digest.update(memoryview(np.ascontiguousarray(volume)).cast("B"))
    return digest.hexdigest()


def effective_inference(spec: Experiment, overrides: dict[str, Any], where: str) -> InferenceSpec:
    """The run's ``[inference]`` with ``overrides`` applied and validated (``where`` names it in errors)."""
    try:
        return InferenceSpec.model_validate({**spec.inference.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"{where}: invalid [inference] override ({problems}). Use the keys of [inference] "
                        "(`vlab schema`).") from None


def inference_key(run: Run, spec: Experiment, inference: InferenceSpec, checkpoint_name: str) -> str:
    """The cache folder name of ``run`` predicting with ``inference`` (see the module docstring)."""
    settings = {k: v for k, v in inference.model_dump(mode="json").items() if k not in NOT_IN_KEY}
    settings["window"] = list(inference.window or spec.data.window)
    summary = run.path / "summary.json"
    stamp = [summary.stat().st_mtime_ns, summary.stat().st_size] if summary.is_file() else None
    text = json.dumps({"inference": settings, "checkpoint": checkpoint_name, "summary": stamp}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


#: Opens a run to predict with it: (run path, device=, checkpoint_name=, overrides=) -> an object whose
#: ``probabilities(volume)`` gives float (D, H, W) (:func:`vesuvius_lab.core.inference.run_kinds.load_run`).
RunLoader = Callable[..., Any]


class CachedRun:
    """One run's probabilities: read from its cache, or predicted once (the run opened by ``load`` on first
    need) and stored."""

    def __init__(self, run: Run, spec: Experiment, *, overrides: dict[str, Any] | None = None,
                 device: str = "cpu", checkpoint_name: str = "best", label: str | None = None,
                 load: RunLoader | None = None):
        self.run, self.spec, self.device, self.checkpoint_name = run, spec, device, checkpoint_name
        self.load = load
        self.label = label or f"{run.experiment}/{run.id}"
        self.inference = effective_inference(spec, overrides or {}, f"member {self.label}")
        self.folder = run.path / CACHE_FOLDER / inference_key(run, spec, self.inference, checkpoint_name)
        self.predictions = 0  # volumes predicted (not read from the cache) by this object
        self._predictor = None

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def has(self, key: str) -> bool:
        """Whether a sound entry is cached (a damaged one is deleted here, so it is predicted again)."""
        return self._read(key) is not None

    def get(self, volume: np.ndarray, key: str, volume_id: str) -> np.ndarray:
        """float16 (D, H, W) probabilities of ``volume`` (memory-mapped from the cache when stored)."""
        cached = self._read(key)
        if cached is not None:
            check_output(cached, volume.shape, f"member {self.label}: its cached probabilities of volume "
                         f"{volume_id} ({self.path(key)})", "Delete that file to predict the volume again.")
            return cached
        return self._predict(volume, key, volume_id)

    def release(self) -> None:
        """Drop the loaded model (the cache stays)."""
        self._predictor = None

    def _read(self, key: str) -> np.ndarray | None:
        """The cached entry; None when it is not cached yet, or damaged (deleted, so predicted again)."""
        return read_array(self.path(key), check=probabilities_problem)

    def _predict(self, volume: np.ndarray, key: str, volume_id: str) -> np.ndarray:
        if self._predictor is None:
            if self.load is None:
                raise RuntimeError(f"{self.label}: not in the cache, and this CachedRun was made without `load`")
            self._predictor = self.load(self.run.path, device=self.device, checkpoint_name=self.checkpoint_name,
                                       overrides=dict(self.inference))  # validated fields, blend stays a PluginRef
        probabilities = self._predictor.probabilities(np.asarray(volume))
        check_output(probabilities, volume.shape, f"member {self.label} (model {self.spec.model_label}) predicted "
                     f"volume {volume_id}", "A member must return one surface probability per voxel.")
        write_array(self.path(key), np.asarray(probabilities, dtype=np.float16))
        del probabilities
        self.predictions += 1
        return np.load(self.path(key), mmap_mode="r")


def check_output(probabilities: np.ndarray, shape: tuple[int, ...], what: str, fix: str) -> None:
    """Refuse probabilities that are not one float in [0, 1] per voxel of ``shape``: other shapes, extra
    channels, NaN or values outside [0, 1] (a diverged model), which would record a wrong score."""
    found = tuple(probabilities.shape)
    if found == tuple(shape) and np.issubdtype(probabilities.dtype, np.floating):
        values = probabilities_problem(probabilities)
        if values is None:
            return
        raise UserError(f"{what}: {values}, so it cannot be combined with the other members. A member must "
                        "predict surface probabilities in [0, 1]; check that run (a diverged model predicts "
                        "NaN), or leave it out of the ensemble.")
    if len(found) == 4 and found[1:] == tuple(shape):
        problem = f"{found[0]} channels"
    elif not np.issubdtype(probabilities.dtype, np.floating):
        problem = f"{probabilities.dtype} values instead of float probabilities"
    else:
        problem = f"the shape {found}"
    raise UserError(f"{what}: got {problem}, but the volume is {tuple(shape)}, so it cannot be combined with the "
                    f"other members. {fix} Members must be runs that predict (D, H, W) surface probabilities.")
