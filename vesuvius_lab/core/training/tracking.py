"""Trackers: the one place the trainer talks to TensorBoard, MLflow, W&B, ... (the ``trackers`` plugins).

The contract, for tracker authors
---------------------------------
A ``trackers`` plugin (``[project.entry-points."vesuvius_lab.trackers"]``) is a
:class:`~vesuvius_lab.core.registry.Plugin` whose factory is called as ``factory(params,
runs_dir=...)`` (``runs_dir``: the project's runs folder) and returns a :class:`Tracker`: an object
with four methods, which training calls in the main process only (rank 0 under DDP), in this order:

``start(run_dir, params)``
    once when training starts, and again in the new process when a run is resumed. ``run_dir`` is
    the run folder ``runs/<experiment>/<run-id>/`` (``run_dir.parent.name`` is the experiment,
    ``run_dir.name`` the run id); ``params`` the resolved spec flattened to dotted keys
    (``train.lr``, ``loss.0.plugin``, ``model.params.encoder``), each value a JSON value: a string,
    number, bool, None, or a list of them. A tracker that can continue its own record of a run
    keeps what it needs for that in the run folder (the ``mlflow`` tracker keeps its run id there).
``log_metrics(metrics, step)``
    after each epoch, with the epoch's record of ``metrics.jsonl`` as scalars named ``loss``,
    ``loss/<term>`` (each loss term), ``lr``, ``samples_per_s``, ``time_s`` and, after a
    validation, ``val/score``, ``val/topo_score``, ``val/surface_dice``, ``val/voi_score`` and
    ``val/steps/<step>`` (the score after each post-processing step); ``step`` is the epoch
    (1, 2, ...). A backend that trains by itself (nnU-Net) gives one record, its last epoch's.
``log_artifact(path)``
    when a run finished, once for each picture its folder holds (PNG, JPEG, GIF or SVG: those
    ``vlab report`` wrote, a backend's own plots). Log what you can show, ignore the rest.
``finish(summary, status)``
    last, always, also when training fails or is interrupted: ``summary`` is the run's
    ``summary.json`` (``{}`` unless the run finished; its numbers are :func:`numbers`),
    ``status`` is ``"finished"``, ``"failed"`` or ``"interrupted"``. Flush and close here.

A tracker never stops training: any exception it raises (a server that is down, a full disk) is
caught, warned about once, naming the tracker and the error, and that tracker is dropped for the
rest of the run while training goes on. So is an exception in a thread that the tracker (or its
library) started during one of its calls, e.g. a writer thread: one warning, no thread traceback.
A tracker that knows what went wrong raises :class:`TrackerError` with one sentence, shown as it
is. Its calls run in the training process between epochs, so a tracker that talks to a server
keeps its timeouts short.

The ``[[tracker]]`` tables of ``vesuvius.toml`` and of the experiment name the trackers (see
:func:`vesuvius_lab.core.config.project.merge_trackers`); they are recorded in the run's spec, so a
resumed run reports to the same trackers, and they are not part of what makes two specs the
same (adding a tracker retrains nothing).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, runtime_checkable

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.spec import Experiment, TrackerRef
from vesuvius_lab.core.console import err
from vesuvius_lab.core.errors import brief
from vesuvius_lab.core.runs.folder import Run
from vesuvius_lab.core.runs.records import flatten

Status = Literal["finished", "failed", "interrupted"]

#: The files of a run folder sent to trackers as pictures.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
#: How an epoch record's tables are named in scalar names: ``loss_terms.dice`` is ``loss/dice``.
TABLE_NAMES = {"loss_terms": "loss"}
METHODS = ("start", "log_metrics", "log_artifact", "finish")


class TrackerError(RuntimeError):
    """What a tracker raises when it knows the cause: the message (one sentence, what is wrong and what
    to do) is shown as it is in the one warning, without the exception's type."""


@runtime_checkable
class Tracker(Protocol):
    """What a ``trackers`` plugin's factory returns (see the module's docstring for when each is called)."""

    def start(self, run_dir: Path, params: dict[str, Any]) -> None:
        """The run starts (or resumes): its folder, and the resolved spec as dotted keys."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One epoch's scalars (``loss``, ``loss/dice``, ``lr``, ``val/score``, ...); ``step`` is the epoch."""

    def log_artifact(self, path: Path) -> None:
        """A picture of the finished run (a file inside its folder)."""

    def finish(self, summary: dict[str, Any], status: Status) -> None:
        """The end: ``summary.json`` (``{}`` unless finished) and how the run ended. Flush and close."""


def numbers(table: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record, nested tables joined with "/" (``{"val": {"score": 0.5}}`` -> ``val/score``);
    strings, bools and None are left out."""
    found: dict[str, float] = {}
    for key, value in table.items():
        name = prefix + str(key)
        if isinstance(value, dict):
            found.update(numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def epoch_scalars(record: dict) -> dict[str, float]:
    """The scalars of an epoch's record in ``metrics.jsonl`` (its ``epoch`` is the step, not a scalar)."""
    found: dict[str, float] = {}
    for key, value in record.items():
        if key != "epoch":  # "loss" and the "loss_terms" table both land under "loss"
            found.update(numbers({TABLE_NAMES.get(key, key): value}))
    return found


def params_of(spec: Experiment) -> dict[str, Any]:
    """The resolved spec as dotted keys, trackers left out (they are where a run is watched, not what it is)."""
    return flatten(spec.model_dump(mode="json", exclude={"tracker"}))


def pictures(run_dir: Path) -> list[Path]:
    """The image files in a run folder and its subfolders, hidden ones skipped, sorted."""
    found = []
    for path in sorted(Path(run_dir).rglob("*")):
        relative = path.relative_to(run_dir)
        if path.suffix.lower() in PICTURE_SUFFIXES and not any(part.startswith(".") for part in relative.parts) \
                and path.is_file():
            found.append(path)
    return found


def _warn(run_dir: Path, name: str, what: str, exc: BaseException) -> None:
    reason = brief(exc, 400).rstrip(".") if isinstance(exc, TrackerError) else f"{type(exc).__name__}: {brief(exc)}"
    text = (f'warning: tracker "{name}" failed ({what}): {reason}. Training goes on; '
            f'this run is no longer sent to "{name}".')
    err.print(text, style="yellow", markup=False, highlight=False)
    try:
        Run(Path(run_dir)).log(text)
    except OSError:
        pass


#: The tracker call in progress, with the threads alive before it (a thread it starts is the tracker's).
_calling: list[tuple["_Guarded", set[threading.Thread]]] = []


class _Guarded:
    """One tracker: each call that raises, or a thread started during a call that raises later, warns
    once and drops the tracker for the rest of the run."""

    def __init__(self, name: str, tracker: Tracker, run_dir: Path):
        self.name, self.tracker, self.run_dir = name, tracker, run_dir
        self.threads: set[threading.Thread] = set()  # started during this tracker's calls

    def call(self, method: str, *args: Any) -> None:
        if self.tracker is None:
            return
        before = set(threading.enumerate())
        _calling.append((self, before))
        try:
            getattr(self.tracker, method)(*args)
        except Exception as exc:
            self.fail(method, exc)
        finally:
            _calling.pop()
            self.threads |= set(threading.enumerate()) - before

    def owns(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` was started by one of this tracker's calls (the one running now included)."""
        return thread in self.threads or any(g is self and thread not in before for g, before in _calling)

    def fail(self, what: str, exc: BaseException) -> None:
        """Warn (once: a tracker already dropped says nothing more) and drop the tracker."""
        if self.tracker is None:
            return
        self.tracker = None
        _warn(self.run_dir, self.name, what, exc)


@contextmanager
def _thread_errors(guarded: list[_Guarded]) -> Iterator[None]:
    """Exceptions in the threads that trackers started become their tracker's one warning, not a thread
    traceback each; other threads' exceptions go to the hook that was there before."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        owner = next((g for g in guarded if g.owns(args.thread)), None)
        if owner is None or args.exc_value is None:
            previous(args)
        elif not isinstance(args.exc_value, (SystemExit, KeyboardInterrupt)):
            owner.fail(f"in its thread {args.thread.name}", args.exc_value)

    threading.excepthook = hook
    try:
        yield
    finally:
        if threading.excepthook is hook:
            threading.excepthook = previous


class Trackers:
    """A run's trackers, each guarded: what training calls (nothing happens when there are none)."""

    def __init__(self, run_dir: Path, guarded: list[_Guarded]):
        self.run_dir, self.guarded, self.finished = Path(run_dir), guarded, False

    @property
    def names(self) -> list[str]:
        """The trackers still working."""
        return [g.name for g in self.guarded if g.tracker is not None]

    def __bool__(self) -> bool:
        return bool(self.names)

    def _each(self, method: str, *args: Any) -> None:
        for guarded in self.guarded:
            guarded.call(method, *args)

    def start(self, params: dict[str, Any]) -> None:
        self._each("start", self.run_dir, params)

    def log_epoch(self, record: dict) -> None:
        """An epoch's record, as appended to ``metrics.jsonl``."""
        if self:
            self._each("log_metrics", epoch_scalars(record), int(record.get("epoch", 0)))

    def finish(self, status: Status, summary: dict[str, Any] | None = None) -> None:
        """Send the pictures of a finished run, then finish every tracker (once)."""
        if self.finished:
            return
        self.finished = True
        if status == "finished" and self:
            for picture in pictures(self.run_dir):
                self._each("log_artifact", picture)
        self._each("finish", dict(summary or {}), status)


def build_trackers(refs: list[TrackerRef], run_dir: Path, runs_dir: Path) -> Trackers:
    """The enabled trackers of ``refs``; one that cannot be built is warned about and left out."""
    guarded = []
    for ref in refs:
        if not ref.enabled:
            continue
        try:
            tracker = registry.build("trackers", ref.plugin, ref.params, runs_dir=Path(runs_dir))
            missing = [m for m in METHODS if not callable(getattr(tracker, m, None))]
            if missing:
                raise TypeError(f"its factory returned a {type(tracker).__name__} without {', '.join(missing)}; "
                                "see vesuvius_lab/core/training/tracking.py for the Tracker contract")
        except Exception as exc:  # unknown, broken or not a tracker: training goes on without it
            _warn(run_dir, ref.plugin, "building it", exc)
            continue
        guarded.append(_Guarded(ref.plugin, tracker, Path(run_dir)))
    return Trackers(Path(run_dir), guarded)


@contextmanager
def tracked(spec: Experiment, run_dir: Path, runs_dir: Path, *, enabled: bool = True) -> Iterator[Trackers]:
    """Start the spec's trackers (only where ``enabled``: the main rank) and yield them for ``log_epoch``.
    When the block ends they finish: with ``summary.json`` and the run's pictures, or as failed or
    interrupted when it raises (the exception goes on)."""
    trackers = build_trackers(spec.tracker if enabled else [], run_dir, runs_dir)
    with _thread_errors(trackers.guarded):
        trackers.start(params_of(spec))
        try:
            yield trackers
        except KeyboardInterrupt:  # Ctrl-C and stop signals (interrupts.Interrupted)
            trackers.finish("interrupted")
            raise
        except BaseException:
            trackers.finish("failed")
            raise
        trackers.finish("finished", Run(Path(run_dir)).read("summary.json", {}))
