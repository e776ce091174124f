"""The user's text files, read one way: experiment files and their ``extends`` parents,
``vesuvius.toml``, ``train.csv`` and ``test.csv``.

:func:`read_text` is the one place where a file that cannot be read (permission denied, a folder,
a symlink loop) or is not UTF-8 becomes a :class:`TextFileError` that names the file and says
what to do. :func:`clip` is the one rule for echoing the user's input in a message: a 5 MB value
given to a field is shown by its first characters, never in full.
"""

from __future__ import annotations

import codecs
import errno
import re
from pathlib import Path
from typing import Any

from vesuvius_lab.core.errors import UserError, os_error_message

#: Echoed input longer than this is cut, with an ellipsis.
ECHO_LIMIT = 80
#: A run this long without a space or a slash is an echoed value, never prose or a part of a path.
_LONG_RUN = re.compile(r"[^\s/\\]{%d,}" % (2 * ECHO_LIMIT))


class TextFileError(UserError):
    """A text file that cannot be read or is not UTF-8; ``reason`` is the message without the path."""

    def __init__(self, path: Path, reason: str, line: int | None = None, *, missing: bool = False):
        self.path, self.reason, self.line, self.missing = Path(path), reason, line, missing
        super().__init__(f"{path}{f':{line}' if line else ''}: {reason}")


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file; a leading byte-order mark (as Windows editors write) is dropped.

    Raises :class:`TextFileError`; its ``missing`` is true when nothing is at the path, so callers
    can say what the missing file is for.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:  # the path goes in front, not into the reason
        raise TextFileError(path, os_error_message(OSError(exc.errno, exc.strerror)),
                            missing=exc.errno == errno.ENOENT) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc.start, exc.reason) from None
    if "\x00" in text:  # valid UTF-8, but no text file holds NUL: UTF-16 without a byte-order mark, or binary
        raise _not_utf8(path, data, data.index(0), "a NUL byte (the file is UTF-16 or binary)")
    return text.removeprefix("\ufeff")


def _not_utf8(path: Path, data: bytes, offset: int, reason: str) -> TextFileError:
    """The message for bytes that are not UTF-8: where, and what the file most likely is instead."""
    encoding = detected_encoding(data)
    if encoding is None:
        what = "it does not look like text in any encoding (a binary file?). Save it as UTF-8 text"
    else:
        name = _iconv_name(encoding)
        what = (f"it looks like {name} (guessed from its bytes). Save it as UTF-8 in your editor, or convert it "
                f"with `iconv -f {name} -t UTF-8 {path} > {path.name}.utf8` and use that file (check the "
                "converted text: a guess from a few bytes can be wrong)")
    return TextFileError(path, f"not UTF-8 text: byte {offset} (0x{data[offset]:02x}): {reason}; {what}, then run "
                               "again.", data.count(b"\n", 0, offset) + 1)


def detected_encoding(data: bytes) -> str | None:
    """The encoding ``data`` most likely is in (a Python codec name), or None when it does not look like
    text: a byte-order mark says it for sure, else charset_normalizer guesses from the bytes."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf_16"
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # not installed: say nothing rather than guess
        return None
    best = from_bytes(data[:MAX_SNIFF]).best()
    return best.encoding if best is not None and best.encoding not in ("utf_8", "ascii") else None


#: Bytes of a file the encoding is guessed from: enough for any experiment file, quick on a large one.
MAX_SNIFF = 256 * 1024
#: iconv's names where they are not Python's in capitals with hyphens.
_ICONV = {"latin_1": "ISO-8859-1", "utf_16": "UTF-16", "utf_16_le": "UTF-16LE", "utf_16_be": "UTF-16BE",
          "utf_32": "UTF-32", "utf_32_le": "UTF-32LE", "utf_32_be": "UTF-32BE", "shift_jis_2004": "SHIFT_JISX0213",
          "mac_roman": "MACINTOSH", "kz1048": "KZ-1048"}


def _iconv_name(encoding: str) -> str:
    try:
        encoding = codecs.lookup(encoding).name.replace("-", "_")
    except LookupError:
        pass
    return _ICONV.get(encoding) or encoding.upper().replace("_", "-")


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text``, cut to ``limit`` characters with an ellipsis when longer."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def echo(value: Any) -> str:
    """A value of the user's as a message shows it: its repr, clipped."""
    return clip(repr(value))


def clip_long_runs(message: str) -> str:
    """Clip the echoed values in a message that did not clip them itself (a plugin's own message, say)."""
    return _LONG_RUN.sub(lambda match: clip(match.group()), message)
