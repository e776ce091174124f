"""Line numbers of the keys of a TOML document, so that errors can point at the line to fix.

``tomllib`` parses but forgets positions; this scanner maps every key path it can see
(``("loss", 1, "params", "alpha")``) to the line where that key is written. Tables, arrays of
tables, dotted keys and inline tables/arrays on one line are understood; for anything deeper,
:func:`line_of` falls back to the line of the closest enclosing key.
"""

from __future__ import annotations

import re

Path_ = tuple  # a key path: str keys and int list indices

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _read_key(text: str, i: int) -> tuple[list[str], int]:
    """Read a (possibly dotted, possibly quoted) key at ``text[i:]``; return its parts and the end."""
    parts: list[str] = []
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] in "\"'":
            quote = text[i]
            end = text.find(quote, i + 1)
            end = len(text) if end < 0 else end
            parts.append(text[i + 1:end])
            i = end + 1
        else:
            match = _BARE_KEY.match(text, i)
            if not match:
                return parts, i
            parts.append(match.group())
            i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return parts, i


def _skip_string(text: str, i: int) -> int:
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        return len(text) if end < 0 else end + 3
    j = i + 1
    while j < len(text) and text[j] != quote:
        j += 2 if quote == '"' and text[j] == "\\" else 1
    return j + 1


def _scan_value(text: str, base: Path_, line: int, out: dict) -> None:
    """Record the keys of inline tables and arrays in one line's value."""
    stack: list[list] = []  # frames: [path, "table" | "array", index]
    i, expect_key = 0, False
    while i < len(text):
        c = text[i]
        if c in " \t,":
            if c == "," and stack:
                if stack[-1][1] == "array":
                    stack[-1][2] += 1
                else:
                    expect_key = True
            i += 1
        elif c == "#":
            return
        elif c in "\"'" and not expect_key:
            _drop_pending(stack)
            i = _skip_string(text, i)
        elif expect_key:
            parts, i = _read_key(text, i)
            if not parts or i >= len(text) or text[i] != "=":
                return
            key_path = stack[-1][0] + tuple(parts)
            out.setdefault(key_path, line)
            stack[-1].append(key_path)  # where the value that follows belongs
            expect_key = False
            i += 1
        elif c in "{[":
            if not stack:
                path = base
            elif stack[-1][1] == "array":
                path = stack[-1][0] + (stack[-1][2],)
                out.setdefault(path, line)
            else:
                path = stack[-1].pop() if len(stack[-1]) > 3 else stack[-1][0]
            stack.append([path, "table" if c == "{" else "array", 0])
            expect_key = c == "{"
            i += 1
        elif c in "}]":
            stack.pop() if stack else None
            if not stack:
                return
            i += 1
        else:
            _drop_pending(stack)
            while i < len(text) and text[i] not in ",}] \t#":
                i += 1


def _drop_pending(stack: list[list]) -> None:
    """A scalar value was read: the key it belongs to is no longer pending."""
    if stack and stack[-1][1] == "table" and len(stack[-1]) > 3:
        stack[-1].pop()


def key_lines(text: str) -> dict[Path_, int]:
    """Map key paths to 1-based line numbers."""
    out: dict[Path_, int] = {}
    table: Path_ = ()
    array_counts: dict[Path_, int] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[["):
            parts, _ = _read_key(line, 2)
            path = tuple(parts)
            index = array_counts[path] = array_counts.get(path, -1) + 1
            table = path + (index,)
            out.setdefault(path, line_no)
            out[table] = line_no
        elif line.startswith("["):
            parts, _ = _read_key(line, 1)
            table = _with_array_indices(tuple(parts), array_counts)
            out.setdefault(table, line_no)
        else:
            parts, end = _read_key(line, 0)
            if parts and end < len(line) and line[end] == "=":
                path = table + tuple(parts)
                out[path] = line_no
                _scan_value(line[end + 1:], path, line_no, out)
    return out


def _with_array_indices(parts: Path_, array_counts: dict[Path_, int]) -> Path_:
    """``[loss.params]`` after the second ``[[loss]]`` means ``("loss", 1, "params")``."""
    result: Path_ = ()
    for end, part in enumerate(parts, start=1):
        result += (part,)
        if parts[:end] in array_counts:
            result += (array_counts[parts[:end]],)
    return result


def line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    """The line of ``path`` or of its closest enclosing key that was seen."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def nesting_line(text: str, limit: int) -> int | None:
    """The line where arrays and inline tables first nest more than ``limit`` deep (for a document too
    deep for ``tomllib`` to parse); strings and comments are skipped."""
    depth, line, i = 0, 1, 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            end = _skip_string(text, i)
            line += text.count("\n", i, end)
            i = end
            continue
        if c == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if c == "\n":
            line += 1
        elif c in "[{":
            depth += 1
            if depth > limit:
                return line
        elif c in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return None
