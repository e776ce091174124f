"""nnU-Net's folders and worker counts, set in ``os.environ`` for one call and restored afterwards.

nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` lazily, so setting
them just before a call works and users never need them in their shell. Its console output is
forwarded line by line to a callback: :func:`to_output_file` appends it to the run's
``backend/nnunet.log`` and passes only its warnings and errors on to the run's log.
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Callable, Iterator

from vesuvius_lab.core.children import scoped_environ


def nnunet_environ(*, raw: Path | None = None, preprocessed: Path | None = None, results: Path | None = None,
                   workers: int = 1, augmentation_workers: int = 1):
    """nnU-Net's folders and process counts for one call (unset folders stay unset).

    ``augmentation_workers=0`` (augment in the training process) is for training only: planning
    calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which rejects 0.
    """
    return scoped_environ(
        nnUNet_raw=raw, nnUNet_preprocessed=preprocessed, nnUNet_results=results,
        nnUNet_def_n_proc=workers, nnUNet_n_proc_DA=augmentation_workers,
    )


@contextmanager
def pool_size(workers: int) -> Iterator[None]:
    """Size nnU-Net's process pools that read ``nnUNet_def_n_proc`` only when nnunetv2 is first imported."""
    import nnunetv2.configuration as configuration
    import nnunetv2.inference.predict_from_raw_data as predictor_module
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    modules = (configuration, trainer_module, predictor_module)
    saved = [module.default_num_processes for module in modules]
    try:
        for module in modules:
            module.default_num_processes = workers
        yield
    finally:
        for module, value in zip(modules, saved):
            module.default_num_processes = value


class _LineForwarder(io.TextIOBase):
    """A text stream that hands every complete line to ``emit`` (with the real stdout restored)."""

    def __init__(self, emit: Callable[[str], None], real: io.TextIOBase):
        self._emit, self._real, self._buffer, self._busy = emit, real, "", False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._busy:  # the callback itself printing: let it through
            return self._real.write(text)
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._send(line)
        return len(text)

    def flush(self) -> None:
        self._real.flush()

    def finish(self) -> None:
        if self._buffer:
            self._send(self._buffer)
            self._buffer = ""

    def _send(self, line: str) -> None:
        if not line.strip():
            return
        self._busy, saved = True, sys.stdout
        sys.stdout = self._real
        try:
            self._emit(line.rstrip())
        finally:
            sys.stdout, self._busy = saved, False


#: Lines of nnU-Net's console output that also reach the run's log (and the console).
_NOTABLE = ("warning", "error", "exception")


def to_output_file(path: Path | None, log: Callable[[str], None]) -> Callable[[str], None]:
    """A line sink for nnU-Net's console output: appended to ``path``; warnings and errors also go to ``log``.
    Without a path every line goes to ``log``."""
    if path is None:
        return log
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def emit(line: str) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        if any(word in line.lower() for word in _NOTABLE):
            log(f"nnU-Net: {line.strip()}")

    return emit


@contextmanager
def forward_stdout(emit: Callable[[str], None]) -> Iterator[None]:
    """Send what nnU-Net prints in this process to ``emit``, one line at a time."""
    forwarder = _LineForwarder(emit, sys.stdout)
    try:
        with redirect_stdout(forwarder):
            yield
    finally:
        forwarder.finish()
