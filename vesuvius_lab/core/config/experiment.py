"""Loading experiment files: ``extends``, ``--set`` overrides, validation with every error at once.

Each problem is reported with its file, line and key path and, where a name was misspelt, the
closest valid name. Plugin ``params`` are validated by the named plugin's own ``Params`` model,
importing only the plugins the file names.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ValidationError

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.config.text import TextFileError, clip, clip_long_runs, echo, read_text
from vesuvius_lab.core.config.tomlpos import key_lines, line_of, nesting_line
from vesuvius_lab.core.errors import UserError

COMMAND_LINE = "--set"
#: Tables and arrays nested deeper than this are refused: no setting needs it, and Python's TOML
#: parser (and every recursive step after it) would hit the recursion limit not far beyond.
MAX_DEPTH = 64
TOO_DEEP = (f"tables and arrays nested more than {MAX_DEPTH} levels deep. No setting needs so many levels; "
            "remove the extra ones.")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        # The one place problems become text, so echoed input (a --set, a key, a value) is clipped here.
        file = clip(self.file) if self.file.startswith(COMMAND_LINE) else self.file
        where = f"{file}:{self.line}" if self.line else file
        path = clip(self.path)
        return f"{where}: {path + ': ' if path else ''}{clip_long_runs(self.message)}"


class SpecError(UserError):
    """One or more problems in experiment files (or ``vesuvius.toml``); the message lists them all."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


@dataclass
class _Source:
    """A merged raw document and, for each key path, the file and line it came from."""

    data: dict = field(default_factory=dict)
    origin: dict[tuple, tuple[str, int | None]] = field(default_factory=dict)

    def where(self, path: tuple) -> tuple[str, int | None]:
        for end in range(len(path), -1, -1):
            if path[:end] in self.origin:
                return self.origin[path[:end]]
        return next(iter(self.origin.values()), ("?", None))


@dataclass(frozen=True)
class LoadedExperiment:
    spec: Experiment
    file: Path
    files: tuple[Path, ...]  # the file and every file it extends


class OverrideError(UserError):
    """A ``--set KEY=VALUE`` that cannot be applied; it is reported as coming from the command line."""

    def __init__(self, text: str, reason: str):
        self.problem = Problem(f"{COMMAND_LINE} {text}", None, "", reason)
        super().__init__(str(self.problem))


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``a.b=value`` -> (("a", "b"), value); the value is read as TOML, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise OverrideError(text, "expected KEY=VALUE, e.g. --set train.epochs=3.")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    except RecursionError:
        raise OverrideError(text, TOO_DEEP) from None
    if _too_deep(parsed) is not None:
        raise OverrideError(text, TOO_DEEP)
    return tuple(part.strip() for part in key.split(".")), parsed


def _set_key(data: dict, keys: tuple[str, ...], value: Any, text: str) -> tuple:
    """Set ``data[k1][k2]...`` (a digit indexes a list, e.g. ``loss.0.weight``). Return the path of what
    changed: the key path, or the first table on it that had to be created (so that a problem anywhere
    below, an unknown key included, is blamed on the command line)."""
    node: Any = data
    path: tuple = ()
    created = None
    for position, key in enumerate(keys):
        if isinstance(node, list):
            if not (key.isdigit() and int(key) < len(node)):
                raise OverrideError(text, _no_item(path, node, key))
            key = int(key)
        elif not isinstance(node, dict):
            raise OverrideError(text, f'{_dotted(path)} is {echo(node)}, not a table, so it has '
                                f'no key "{clip(key)}". Check the key path against `vlab schema`.')
        path += (key,)
        if position == len(keys) - 1:
            node[key] = value
            break
        if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
            if keys[position + 1].isdigit():
                raise OverrideError(text, f"there is no list {_dotted(path)} in the experiment file, "
                                    f"so it has no item {keys[position + 1]}. Give the whole value instead "
                                    f"(--set {_dotted(path)}=[...]).")
            node[key] = {}
            created = created or path
        node = node[key]
    return created or path


def _no_item(path: tuple, items: list, key: str) -> str:
    count = f"{len(items)} item{'' if len(items) == 1 else 's'}" + (f" (0 to {len(items) - 1})" if items else "")
    return (f"the list {_dotted(path)} has {count}, so there is no item {clip(key)}. Give the index of an item, "
            f"or the whole list (--set {_dotted(path)}=[...]).")


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _too_deep(data: Any) -> tuple | None:
    """The key path of a value nested more than :data:`MAX_DEPTH` levels deep, or None (no recursion:
    the data may be deeper than Python's recursion limit allows)."""
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        if len(path) > MAX_DEPTH:
            return path
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((path + (key,), child) for key, child in children)
    return None


def _real_path(path: Path) -> Path:
    """The absolute path with symlinks resolved; a symlink loop is left for the read to report
    (``Path.resolve`` raises RuntimeError on one before Python 3.13)."""
    return Path(os.path.realpath(path))


def toml_source(path: Path, text: str, problems: list[Problem]) -> _Source | None:
    """A TOML file's text as a :class:`_Source`; None (and a problem) on a syntax error or deep nesting."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, message = _syntax_position(exc)
        problems.append(Problem(str(path), line, "", f"TOML syntax error: {message}. "
                                "Fix the syntax (strings need quotes, tables [name], lists [a, b])."))
        return None
    except RecursionError:
        problems.append(Problem(str(path), nesting_line(text, MAX_DEPTH), "", TOO_DEEP))
        return None
    lines = key_lines(text)
    deep = _too_deep(data)
    if deep is not None:
        problems.append(Problem(str(path), line_of(lines, deep), "", TOO_DEEP))
        return None
    origin = {path_: (str(path), lines.get(path_) or line_of(lines, path_)) for path_ in _paths(data)}
    origin[()] = (str(path), None)
    return _Source(data, origin)


def _syntax_position(exc: tomllib.TOMLDecodeError) -> tuple[int | None, str]:
    """(line, message without the position): Python 3.14 has ``lineno``; older ones put it in the text."""
    text = str(getattr(exc, "msg", exc))
    match = re.search(r"\s*\(at line (\d+), column \d+\)", text)
    line = getattr(exc, "lineno", None) or (int(match.group(1)) if match else None)
    return line, text[:match.start()] if match else text


def _paths(data: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield prefix + (index,)
            yield from _paths(value, prefix + (index,))


def _replaced(child: dict, path: tuple) -> bool:
    """Whether ``child`` sets ``path`` or replaces a table above it with a non-table value."""
    node: Any = child
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
        if not isinstance(node, dict):
            return True
    return True


def _switched_plugins(parent: dict, child: dict, prefix: tuple = ()) -> set[tuple]:
    """Key paths of the tables that name a plugin in both documents, but another one in ``child``.

    A plugin's ``params`` belong to that plugin: a child that switches ``model.plugin`` (or any other
    table's plugin) replaces the parent's table whole, so the old plugin's params are not inherited.
    """
    switched = set()
    for key, value in child.items():
        other = parent.get(key)
        if not (isinstance(value, dict) and isinstance(other, dict)):
            continue
        if "plugin" in value and "plugin" in other and value["plugin"] != other["plugin"]:
            switched.add(prefix + (key,))
        else:
            switched |= _switched_plugins(other, value, prefix + (key,))
    return switched


def _merge(parent: _Source, child: _Source) -> _Source:
    """Deep merge: tables merge key by key; any other value (lists included) replaces the parent's, and so
    does a table that names another plugin than the parent's (see :func:`_switched_plugins`)."""
    switched = _switched_plugins(parent.data, child.data)

    def merge(a: dict, b: dict, path: tuple) -> dict:
        out = copy.deepcopy(a)
        for key, value in b.items():
            inner = path + (key,)
            if isinstance(value, dict) and isinstance(out.get(key), dict) and inner not in switched:
                out[key] = merge(out[key], value, inner)
            else:
                out[key] = copy.deepcopy(value)
        return out

    def kept(path: tuple) -> bool:
        return not path or not (_replaced(child.data, path) or any(path[:len(s)] == s for s in switched))

    origin = {p: o for p, o in parent.origin.items() if kept(p)}
    origin.update({p: o for p, o in child.origin.items() if p})
    return _Source(merge(parent.data, child.data, ()), origin)


def _load_source(path: Path, problems: list[Problem], chain: tuple[Path, ...] = (),
                 extended_by: tuple[str, int | None, str] | None = None) -> tuple[_Source | None, tuple[Path, ...]]:
    """The merged document of ``path`` and its parents; ``extended_by`` is (file, line, name) of the
    ``extends`` that names ``path``."""
    path = _real_path(path)
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        problems.append(Problem(str(chain[-1]), None, "extends", f"extends cycle: {cycle}. Remove one link."))
        return None, chain
    files = chain + (path,)
    try:
        text = read_text(path)
    except TextFileError as exc:
        problems.append(_unreadable(exc, extended_by))
        return None, files
    source = toml_source(path, text, problems)
    if source is None:
        return None, files
    merged = _Source()
    file, line = source.where(("extends",))
    for parent in _parents(source, problems):
        parent_source, files = _load_source(path.parent / parent, problems, files, (file, line, parent))
        if parent_source is not None:
            merged = _merge(merged, parent_source)
    return _merge(merged, source), files


def _unreadable(exc: TextFileError, extended_by: tuple[str, int | None, str] | None) -> Problem:
    """A file that cannot be read, blamed on the ``extends`` that names it; text that is not UTF-8 is
    blamed on the file itself, at the line of the first bad byte."""
    if exc.line is not None or extended_by is None:
        return Problem(str(exc.path), exc.line, "", "file not found. Check the path." if exc.missing else exc.reason)
    file, line, name = extended_by
    if exc.missing:
        return Problem(file, line, "extends", f'parent file "{clip(name)}" not found (looked for {exc.path}). '
                       "Paths are relative to this file.")
    return Problem(file, line, "extends", f'parent file "{clip(name)}" cannot be read: {exc.reason}')


def _parents(source: _Source, problems: list[Problem]) -> list[str]:
    """The file names in ``extends`` (removed from the document): one string or a list of them."""
    parents = source.data.pop("extends", None)
    names = [parents] if isinstance(parents, str) else [] if parents is None else parents
    if isinstance(names, list) and all(isinstance(name, str) and name.strip() for name in names):
        return names
    file, line = source.where(("extends",))
    problems.append(Problem(file, line, "extends", 'extends must be a file name or a list of file names, e.g. '
                            'extends = "base.toml" or extends = ["a.toml", "b.toml"] (relative to this file); '
                            f"got {echo(parents)}."))
    return []


def _non_finite(data: Any, path: tuple = ()) -> Iterator[tuple[tuple, float]]:
    """(key path, value) of every inf and nan in a raw document."""
    if isinstance(data, float) and not math.isfinite(data):
        yield path, data
    elif isinstance(data, (dict, list)):
        for key, value in data.items() if isinstance(data, dict) else enumerate(data):
            yield from _non_finite(value, path + (key,))


def non_finite_problems(source: _Source) -> list[Problem]:
    """inf and nan anywhere, plugins' params included (whatever their Params models allow): no setting
    means them, and one would only show later, as a run that diverges or never ends."""
    problems = []
    for path, value in _non_finite(source.data):
        file, line = source.where(path)
        problems.append(Problem(file, line, _dotted(path), f"{value} is not a finite number. Give a finite value "
                                "(inf and nan are refused everywhere)."))
    return problems


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model found at ``loc`` inside ``model`` (for did-you-mean)."""
    for key in loc:
        if isinstance(key, int):
            continue
        info = model.model_fields.get(str(key))
        if info is None:
            return []
        nested = [t for t in _types_in(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _types_in(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _types_in(arg)


def pydantic_problems(exc: ValidationError, source: _Source, model: type[BaseModel],
                      prefix: tuple = ()) -> list[Problem]:
    problems = []
    for error in exc.errors():
        if isinstance(error.get("input"), float) and not math.isfinite(error["input"]):
            continue  # reported by non_finite_problems, once and whatever the model allows
        loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and "[" in part))
        homes = getattr(model, "TOML_HOMES", {})
        if loc and loc[0] in homes:  # a key the file writes in another table
            loc = (homes[loc[0]], *loc[1:])
        file, line = source.where(prefix + loc)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            message = f'unknown key "{clip(str(loc[-1]))}".{registry.suggest(str(loc[-1]), allowed)}'
            if allowed:
                message += f" Allowed here: {', '.join(allowed)}."
        elif error["type"] == "missing":
            message = "this key is required."
        elif "input" in error and not isinstance(error["input"], (dict, list)):
            message += f" (got {echo(error['input'])})"
        problems.append(Problem(file, line, ".".join(map(str, prefix + loc)), message))
    return problems


def _plugin_refs(data: dict) -> Iterator[tuple[tuple, str, Any]]:
    """(key path, group, table) for every place the raw document names a plugin."""

    def items(value: Any) -> list:
        return value if isinstance(value, list) else []

    if data.get("model") is not None:  # an [ensemble] file has no model
        yield ("model",), "models", data["model"]
    for index, term in enumerate(items(data.get("loss"))):
        yield ("loss", index), "losses", term
    inference = data.get("inference") if isinstance(data.get("inference"), dict) else {}
    yield ("inference", "blend"), "blenders", inference.get("blend", {"plugin": "gaussian"})
    for index, step in enumerate(items(data.get("postprocess"))):
        yield ("postprocess", index), "postprocessors", step
    yield from _tracker_refs(data)


def _tracker_refs(data: dict) -> Iterator[tuple[tuple, str, Any]]:
    """(key path, group, table) of each ``[[tracker]]`` table (in an experiment or in vesuvius.toml)."""
    trackers = data.get("tracker")
    for index, table in enumerate(trackers if isinstance(trackers, list) else []):
        yield ("tracker", index), "trackers", table


def tracker_problems(source: _Source) -> list[Problem]:
    """Unknown trackers, bad tracker params and what the trackers' own checks find (a tracking URI of an
    unknown kind, say) in a document: how vesuvius.toml's are checked."""
    problems = _plugin_problems(source.data, source, _tracker_refs(source.data))
    if problems:
        return problems
    for path, group, table in _tracker_refs(source.data):
        if not isinstance(table, dict) or table.get("enabled") is False:
            continue
        plugin = registry.load(group, table["plugin"])
        if plugin.check is not None:
            params = plugin.Params.model_validate(table.get("params", {}))
            problems.extend(_blamed(source, path, key, message) for key, message in plugin.check(params, None))
    return problems


def _blamed(source: _Source, path: tuple, key: str, message: str) -> Problem:
    """A plugin check's problem at ``key`` (relative to the plugin's params) of the table at ``path``."""
    full = path + ("params",) + tuple(k for k in key.split(".") if k)
    file, line = source.where(full)
    return Problem(file, line, ".".join(map(str, full)), message)


def _plugin_problems(data: dict, source: _Source,
                     refs: Iterator[tuple[tuple, str, Any]] | None = None) -> list[Problem]:
    problems = []
    for path, group, table in _plugin_refs(data) if refs is None else refs:
        if not isinstance(table, dict) or not isinstance(table.get("plugin"), str):
            continue  # the spec model reports the wrong shape
        name = table["plugin"]
        try:
            plugin = registry.load(group, name)
        except UserError as exc:
            file, line = source.where(path + ("plugin",))
            problems.append(Problem(file, line, ".".join(map(str, path + ("plugin",))), str(exc)))
            continue
        params = table.get("params", {})
        if not isinstance(params, dict):
            continue
        try:
            plugin.Params.model_validate(params)
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, source, plugin.Params, path + ("params",)))
    return problems


def _check_problems(spec: Experiment, source: _Source) -> list[Problem]:
    """Plugins' own cross-checks against the whole spec (e.g. windows a network cannot take)."""
    problems = []
    for path, group, table in _plugin_refs(spec.model_dump()):
        plugin = registry.load(group, table["plugin"])
        if plugin.check is None or table.get("enabled") is False:  # a tracker turned off is not used
            continue
        params = plugin.Params.model_validate(table.get("params", {}))
        problems.extend(_blamed(source, path, key, message) for key, message in plugin.check(params, spec))
    return problems


def _apply_overrides(source: _Source, overrides: Iterable[str], problems: list[Problem],
                     prefix: tuple[str, ...] = ()) -> None:
    """Apply ``--set KEY=VALUE`` texts to ``source`` (``prefix`` goes in front of each key), blaming what
    they change on the command line."""
    for text in overrides:
        try:
            keys, value = parse_override(text)
            if prefix and keys[:len(prefix)] != prefix:
                keys = prefix + keys
            changed = _set_key(source.data, keys, value, text)
        except OverrideError as exc:
            problems.append(exc.problem)
            continue
        source.origin = {p: o for p, o in source.origin.items() if p[:len(changed)] != changed}
        source.origin[changed] = (f"{COMMAND_LINE} {text}", None)


def _validated(source: _Source, problems: list[Problem]) -> Experiment:
    """The spec of a merged, overridden document after every check of a single document; raise
    :class:`SpecError` listing every problem (with those already found)."""
    problems.extend(non_finite_problems(source))
    spec = None
    try:
        spec = Experiment.model_validate(source.data)
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, source, Experiment))
    problems.extend(_plugin_problems(source.data, source))
    if spec is not None and not problems:
        problems.extend(_check_problems(spec, source))
    if problems:
        raise SpecError(problems)
    return spec


def load_experiment(path: str | Path, overrides: Iterable[str] = ()) -> LoadedExperiment:
    """Load, merge, override and validate one experiment document; raise :class:`SpecError` on problems.

    This checks one document only. Commands read experiment files through
    :func:`vesuvius_lab.core.config.checked.read_experiment`, which also checks every ``[sweep]``
    combination and the ``[tune]`` space, exactly as ``vlab validate`` does.
    """
    path = Path(path)
    problems: list[Problem] = []
    source, files = _load_source(path, problems)
    if source is None or problems:
        # A file (or a parent) that cannot be read or parsed is reported once: validating what is left
        # of the merge would add one error per key that the missing file would have set.
        raise SpecError(problems)
    _apply_overrides(source, overrides, problems)
    return LoadedExperiment(_validated(source, problems), path.resolve(), files)


def load_record(record: Path, data: dict, overrides: Iterable[str] = (),
                prefix: tuple[str, ...] = ()) -> Experiment:
    """A recorded spec (a run's ``spec.json``, read as ``data``) with ``--set`` overrides applied and
    checked exactly as an experiment file's are; problems of the record itself are blamed on ``record``.
    ``prefix`` is put in front of override keys that lack it (``overlap=0.25`` for ``inference.overlap``)."""
    problems: list[Problem] = []
    source = _Source(copy.deepcopy(data), {(): (str(record), None)})
    _apply_overrides(source, overrides, problems, prefix)
    return _validated(source, problems)
