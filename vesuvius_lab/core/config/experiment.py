"""Loading experiment files: ``extends``, ``--set`` overrides, validation with every error at once.

Each problem is reported with its file, line and key path and, where a name was misspelt, the
closest valid name. Plugin ``params`` are validated by the named plugin's own ``Params`` model,
importing only the plugins the file names.
"""

from __future__ import annotations

import copy
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ValidationError

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.spec import Experiment
from vesuvius_lab.core.config.tomlpos import key_lines, line_of
from vesuvius_lab.core.errors import UserError

COMMAND_LINE = "--set"


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path + ': ' if self.path else ''}{self.message}"


class SpecError(UserError):
    """One or more problems in experiment files; the message lists them all."""

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


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``a.b=value`` -> (("a", "b"), value); the value is read as TOML, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f'--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=3.')
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return tuple(key.strip().split(".")), parsed


def _set_key(data: dict, keys: tuple[str, ...], value: Any, text: str) -> tuple:
    """Set ``data[k1][k2]...`` (a digit indexes a list, e.g. ``loss.0.weight``); return the path."""
    node: Any = data
    path: tuple = ()
    for position, key in enumerate(keys):
        last = position == len(keys) - 1
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            key = int(key)
        elif not isinstance(node, dict):
            raise UserError(f"--set {text}: {'.'.join(map(str, path))} is not a table, so it has no "
                            f'key "{key}". Check the key path against `vlab schema`.')
        path += (key,)
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
    return path


def _read(path: Path, problems: list[Problem]) -> _Source | None:
    try:
        text = path.read_text()
    except OSError as exc:
        problems.append(Problem(str(path), None, "", f"cannot read the file ({exc.strerror}). "
                                "Check the path."))
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, message = _syntax_position(exc)
        problems.append(Problem(str(path), line, "", f"TOML syntax error: {message}. "
                                "Fix the syntax (strings need quotes, tables [name], lists [a, b])."))
        return None
    lines = key_lines(text)
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


def _merge(parent: _Source, child: _Source) -> _Source:
    """Deep merge: tables merge key by key; any other value (lists included) replaces the parent's."""

    def merge(a: dict, b: dict) -> dict:
        out = copy.deepcopy(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
                else copy.deepcopy(value)
        return out

    origin = {p: o for p, o in parent.origin.items() if not p or not _replaced(child.data, p)}
    origin.update({p: o for p, o in child.origin.items() if p})
    return _Source(merge(parent.data, child.data), origin)


def _load_source(path: Path, problems: list[Problem], chain: tuple[Path, ...] = ()) -> tuple[_Source | None, tuple[Path, ...]]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        problems.append(Problem(str(chain[-1]), None, "extends", f"extends cycle: {cycle}. Remove one link."))
        return None, chain
    source = _read(path, problems)
    if source is None:
        return None, chain + (path,)
    files = chain + (path,)
    parents = source.data.pop("extends", None)
    merged = _Source()
    for parent in [parents] if isinstance(parents, str) else parents or []:
        parent_path = path.parent / str(parent)
        if not parent_path.is_file():
            file, line = source.where(("extends",))
            problems.append(Problem(file, line, "extends", f'parent file "{parent}" not found '
                                    f"(looked for {parent_path}). Paths are relative to this file."))
            continue
        parent_source, files = _load_source(parent_path, problems, files)
        if parent_source is not None:
            merged = _merge(merged, parent_source)
    return _merge(merged, source), files


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


def _pydantic_problems(exc: ValidationError, source: _Source, model: type[BaseModel],
                       prefix: tuple = ()) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and "[" in part))
        file, line = source.where(prefix + loc)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            message = f'unknown key "{loc[-1]}".{registry.suggest(str(loc[-1]), allowed)}'
            if allowed:
                message += f" Allowed here: {', '.join(allowed)}."
        elif error["type"] == "missing":
            message = "this key is required."
        elif "input" in error and not isinstance(error["input"], (dict, list)):
            message += f" (got {error['input']!r})"
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


def _plugin_problems(data: dict, source: _Source) -> list[Problem]:
    problems = []
    for path, group, table in _plugin_refs(data):
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
            problems.extend(_pydantic_problems(exc, source, plugin.Params, path + ("params",)))
    return problems


def _check_problems(spec: Experiment, source: _Source) -> list[Problem]:
    """Plugins' own cross-checks against the whole spec (e.g. windows a network cannot take)."""
    problems = []
    for path, group, table in _plugin_refs(spec.model_dump()):
        plugin = registry.load(group, table["plugin"])
        if plugin.check is None:
            continue
        params = plugin.Params.model_validate(table.get("params", {}))
        for key, message in plugin.check(params, spec):
            full = path + ("params",) + tuple(k for k in key.split(".") if k)
            file, line = source.where(full)
            problems.append(Problem(file, line, ".".join(map(str, full)), message))
    return problems


def load_experiment(path: str | Path, overrides: list[str] = ()) -> LoadedExperiment:
    """Load, merge, override and validate one experiment file; raise :class:`SpecError` on problems."""
    path = Path(path)
    problems: list[Problem] = []
    source, files = _load_source(path, problems)
    if source is None:
        raise SpecError(problems)
    for text in overrides:
        keys, value = parse_override(text)
        key_path = _set_key(source.data, keys, value, text)
        source.origin = {p: o for p, o in source.origin.items() if p[:len(key_path)] != key_path}
        source.origin[key_path] = (f"{COMMAND_LINE} {text}", None)
    spec = None
    try:
        spec = Experiment.model_validate(source.data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, source, Experiment))
    problems.extend(_plugin_problems(source.data, source))
    if spec is not None and not problems:
        problems.extend(_check_problems(spec, source))
    if problems:
        raise SpecError(problems)
    return LoadedExperiment(spec, path.resolve(), files)
