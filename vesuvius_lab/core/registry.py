"""The plugin registry: entry-point groups, lazy loading, listing, resolving and building.

The contract, for plugin authors
--------------------------------
A plugin is a :class:`Plugin` object that a distribution exposes through an entry point in one
of the groups below, e.g. in its ``pyproject.toml``::

    [project.entry-points."vesuvius_lab.losses"]
    my_loss = "my_package.losses:my_loss"

The object holds a pydantic ``Params`` model (unknown keys forbidden) that validates the
``params`` table of an experiment file, and a factory called as ``factory(params, **context)``
with the validated params and a small, group-specific context (see :data:`CONTEXT`). Factories
take ``**context`` so that the core can add context keys without breaking anyone. The
:func:`plugin` decorator builds the object from a factory function::

    class Params(BaseModel, extra="forbid"):
        gamma: float = 2.0

    @plugin(Params)
    def my_loss(params: Params, **context):
        "Focal-like loss with a tunable gamma."      # first line = the summary in listings
        ...

Keep heavy imports (torch, MONAI, ...) inside the factory: listing plugins imports their
modules, and that must stay cheap.

What each group's factory returns:
  models          (``inference`` is the experiment's InferenceSpec, for backends that predict
                  by themselves) a ``torch.nn.Module`` mapping (B, 1, D, H, W) float windows (intensities scaled
                  to [0, 1]) to (B, C, D, H, W) logits, C = ``out_channels``; or, for a framework
                  that trains and predicts by itself, a
                  :class:`vesuvius_lab.core.contract.backend.SelfTrainingModel`
  losses          a callable ``(logits, target, valid) -> scalar tensor``: logits (B, C, D, H, W)
                  with C = 1 (sigmoid) or 2 (softmax, channel 1 = surface), target (B, 1, D, H, W)
                  float in {0, 1}, valid a bool mask of the target's shape, False where the label
                  is the ignore label (those voxels must contribute nothing); a loss that
                  declares an ``inputs`` keyword also gets the network's input batch
  blenders        a float32 numpy weight map of the window's shape, strictly positive
  postprocessors  a callable ``(volume (D, H, W) numpy) -> numpy``: surface probabilities
                  (float32) or a mask (uint8) in, probabilities or a mask out. A post-processor
                  also says, with ``halo=``, what context it needs to give on a block of a large
                  volume the same result as on the whole volume: a number of voxels (a filter's
                  radius; 0 for a voxel-wise step), ``"global"`` (connected components, anything
                  that looks at the whole volume), or a function of its params returning either.
                  A post-processor that says nothing is taken as ``"global"``. A global one may
                  also give, with ``global_pass=``, a factory like its own (params, context) whose
                  callable maps a chunked dask array to a dask array with the same result: the
                  global pass over a large volume then runs it chunk by chunk (see
                  :mod:`vesuvius_lab.core.inference.global_pass`); without one, the pass takes the
                  whole array in one task, up to a size limit.
  trackers        (``runs_dir`` is the project's runs folder) an object with ``start(run_dir,
                  params)``, ``log_metrics(metrics, step)``, ``log_artifact(path)`` and
                  ``finish(summary, status)``: the :class:`vesuvius_lab.core.training.tracking.Tracker`
                  contract, which sends a run's params, scalars and pictures to TensorBoard, MLflow,
                  W&B, ...; a tracker that raises is warned about once and dropped, never stopping training
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from vesuvius_lab.core.errors import UserError

GROUPS = ("models", "losses", "blenders", "postprocessors", "trackers")
ENTRY_POINT_PREFIX = "vesuvius_lab."

#: The context keys the core passes to each group's factory (a factory may ignore any of them).
CONTEXT = {
    "models": ("window", "in_channels", "out_channels", "inference"),
    "losses": (),
    "blenders": ("window",),
    "postprocessors": ("device", "runs_dir", "threshold"),
    "trackers": ("runs_dir",),
}


class NoParams(BaseModel):
    """Params of a plugin that takes none."""

    model_config = ConfigDict(extra="forbid")


#: What a post-processor needs around a block: a halo in voxels, or "global" (the whole volume at once).
Halo = Union[int, Literal["global"]]
GLOBAL = "global"


#: A check receives the validated params and the whole experiment spec and yields problems as
#: ``(key path relative to the plugin's table, message)``; used by ``vlab validate`` for
#: constraints that depend on the rest of the experiment (e.g. a window the network cannot take).
Check = Callable[[BaseModel, Any], Iterable[tuple[str, str]]]


@dataclass(frozen=True)
class Plugin:
    """A plugin: its params model, its factory, a one-line summary, an optional spec check and (for a
    post-processor) the halo it needs on a block."""

    Params: type[BaseModel]
    factory: Callable[..., Any]
    summary: str = ""
    check: Check | None = None
    halo: Halo | Callable[[BaseModel], Halo] = GLOBAL
    global_pass: Callable[..., Callable[[Any], Any]] | None = None

    def halo_of(self, params: BaseModel | dict | None = None) -> Halo:
        """The halo for these params: voxels a block must be read beyond its core, or ``"global"``."""
        if not callable(self.halo):
            return self.halo
        if not isinstance(params, self.Params):
            params = self.Params.model_validate(params or {})
        return self.halo(params)

    def build_global_pass(self, params: BaseModel | dict | None = None, **context: Any) -> Callable[[Any], Any]:
        """The chunked form of a global post-processor: a function of a dask array (see ``global_pass=``)."""
        if self.global_pass is None:
            raise ValueError("this plugin has no chunked form (global_pass=)")
        return self.global_pass(self._validated(params), **context)

    def build(self, params: BaseModel | dict | None = None, **context: Any) -> Any:
        return self.factory(self._validated(params), **context)

    def _validated(self, params: BaseModel | dict | None) -> BaseModel:
        if not isinstance(params, self.Params):
            try:
                params = self.Params.model_validate(params or {})
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
                raise UserError(f"Invalid params for this plugin: {problems}. `vlab plugins show GROUP NAME` "
                                "lists its params; `vlab validate` checks an experiment file.") from None
        return params


def plugin(params: type[BaseModel] = NoParams, *, summary: str | None = None, check: Check | None = None,
           halo: Halo | Callable[[BaseModel], Halo] = GLOBAL,
           global_pass: Callable[..., Callable[[Any], Any]] | None = None) -> Callable[[Callable[..., Any]], Plugin]:
    """Decorator turning a factory function into a :class:`Plugin` (summary: its docstring's first line)."""

    def wrap(factory: Callable[..., Any]) -> Plugin:
        doc = (factory.__doc__ or "").strip().splitlines()
        return Plugin(params, factory, summary if summary is not None else (doc[0] if doc else ""), check, halo,
                      global_pass)

    return wrap


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``vlab plugins``."""

    group: str
    name: str
    package: str
    version: str
    status: str  # "ok" or "broken: <reason>"
    summary: str
    target: str  # "module:attribute"


class UnknownPluginError(UserError):
    pass


class BrokenPluginError(UserError):
    pass


class DuplicatePluginError(UserError):
    pass


def group_name(group: str) -> str:
    """Accept ``models`` or ``vesuvius_lab.models``; return the short name."""
    short = group.removeprefix(ENTRY_POINT_PREFIX)
    if short not in GROUPS:
        raise UserError(f"Unknown plugin group {group!r}; the groups are {', '.join(GROUPS)}.")
    return short


@dataclass(frozen=True)
class _Entry:
    name: str
    target: str
    package: str
    version: str


@cache
def _entries(group: str) -> dict[str, list[_Entry]]:
    """Entry points of a group by name, without importing anything. Several entries = a clash."""
    found: dict[str, list[_Entry]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_PREFIX + group):
        dist = getattr(ep, "dist", None)
        entry = _Entry(ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
        same = found.setdefault(ep.name, [])
        # A distribution seen twice on sys.path (an editable install, say) is not a clash.
        if not any(e.package == entry.package and e.target == entry.target for e in same):
            same.append(entry)
    return found


def refresh() -> None:
    """Forget what was discovered, e.g. after installing a plugin package in this process."""
    importlib.invalidate_caches()
    _entries.cache_clear()
    _import.cache_clear()


def names(group: str) -> list[str]:
    """The plugin names of a group, sorted, without importing any plugin."""
    return sorted(_entries(group_name(group)))


def suggest(word: str, choices: Iterable[str]) -> str:
    """' Did you mean "x"?' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""


def _entry(group: str, name: str) -> _Entry:
    group = group_name(group)
    entries = _entries(group).get(name)
    if not entries:
        available = names(group)
        raise UnknownPluginError(
            f'No {group} plugin is called "{name}".{suggest(name, available)} '
            f"Available: {', '.join(available) or 'none'}. Plugins are installed packages that "
            f'declare an entry point in the group "{ENTRY_POINT_PREFIX}{group}"; see `vlab plugins`.'
        )
    if len(entries) > 1:
        who = " and ".join(f"{e.package} {e.version} ({e.target})" for e in entries)
        raise DuplicatePluginError(
            f'The {group} plugin name "{name}" is declared by {who}. Uninstall one of them or '
            "ask its author to rename the entry point."
        )
    return entries[0]


@cache
def _import(target: str) -> Plugin:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    if not isinstance(obj, Plugin):
        raise TypeError(f"{target} is a {type(obj).__name__}, not a vesuvius_lab Plugin")
    return obj


def load(group: str, name: str) -> Plugin:
    """Import and return one plugin; only this plugin's module is imported."""
    entry = _entry(group, name)
    try:
        return _import(entry.target)
    except Exception as exc:  # any import-time failure of third-party code makes it "broken"
        raise BrokenPluginError(
            f'The {group_name(group)} plugin "{name}" from {entry.package} {entry.version} is broken: '
            f"importing {entry.target} failed with {type(exc).__name__}: {exc}. Reinstall or fix that "
            "package; other plugins are unaffected."
        ) from exc


def validate_params(group: str, name: str, params: dict | None) -> BaseModel:
    """Validate a ``params`` table with the plugin's own model (raises pydantic.ValidationError)."""
    return load(group, name).Params.model_validate(params or {})


def build(group: str, name: str, params: dict | BaseModel | None = None, **context: Any) -> Any:
    """Resolve ``name`` in ``group``, validate ``params`` and call the factory with ``context``."""
    return load(group, name).build(params, **context)


def describe(group: str | None = None) -> list[PluginInfo]:
    """Every plugin of one group (or all), imported to learn its status and summary."""
    rows = []
    for g in [group_name(group)] if group else GROUPS:
        for name, entries in sorted(_entries(g).items()):
            for entry in entries:
                status, summary = "ok", ""
                if len(entries) > 1:
                    status = "broken: name also declared by " + ", ".join(
                        e.package for e in entries if e is not entry)
                try:
                    summary = _import(entry.target).summary
                except Exception as exc:
                    status = f"broken: {type(exc).__name__}: {exc}"
                rows.append(PluginInfo(g, name, entry.package, entry.version, status, summary, entry.target))
    return rows
