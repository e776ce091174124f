"""Rich tables that fit the page they are printed on, whatever its width, without cutting what matters.

Every table the command line prints is a :class:`FittedTable`. Each column says how it may give way:

- ``KEY``: shown whole and repeated at the left of every table, so that a row can be found again
  (a leaderboard's ``#`` and ``experiment``); rows keep their order in every table.
- ``ESSENTIAL``: shown whole on one line (``0.5845 ± 0.0123``, never ``0.``), laid out before the
  optional columns.
- ``WRAP``: prose or a list; may wrap between words, never inside one (never narrower than its
  longest word).
- ``OPTIONAL``: shown whole where it fits; one with a ``min_width`` is shortened in place with an
  ellipsis (``…``) down to that width; otherwise it moves to a table printed below.

The rule, for a page of ``width`` characters: key columns first, then the essential and wrapping
columns in order, then the optional ones in order; each takes the least width it may have (whole
cells; a header may wrap between its words) if that still fits, and otherwise moves on to the next
table, which starts again with the key columns. Nothing is squeezed to a sliver. Width that is left
over goes, a character each in turn, to the columns narrower than their whole width. A column that
fits on no table beside the keys gets a table of its own: an optional one ellipsized to the page, a
wrapping one wrapped between words, an essential one whole. Titles and captions wrap between words
too. A word (or an essential cell) wider than what is left of the page is never broken: its line is
longer than the page. Cells are one line: a line break in a value becomes a space.

With ``wide`` there is one table, every column whole, however wide the page: for logs and
``less -S``. Print with ``crop=False`` (the consoles of :mod:`vesuvius_lab.core.console` never crop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

KEY, ESSENTIAL, WRAP, OPTIONAL = "key", "essential", "wrap", "optional"

#: Characters between two columns: the separator of ``box.SIMPLE_HEAD`` and one space of padding.
GAP = 2

#: The narrowest an optional column is shortened to when it has a table to itself.
NARROWEST = 8


@dataclass(frozen=True)
class Col:
    """One column: its header, how it may give way (``KEY``, ``ESSENTIAL``, ``WRAP``, ``OPTIONAL``)."""

    header: str
    role: str = OPTIONAL
    justify: str = "left"
    min_width: int | None = None  # OPTIONAL only: shortened in place with "…" down to this width
    header_style: str | None = None


@dataclass(frozen=True)
class Placed:
    """A column in one table of the layout: its position in the columns, its width and how it fits."""

    index: int
    width: int
    mode: str  # "whole", "wrap" (between words) or "ellipsis"


@dataclass
class _Row:
    cells: list[Text]
    style: str | None
    end_section: bool = False


def one_line(value: str | Text) -> Text:
    """A cell as one line of rich text (strings are taken literally, never as markup)."""
    text = value.copy() if isinstance(value, Text) else Text(str(value))
    if "\n" in text.plain:
        text = Text(" ").join(text.split("\n"))
    return text


def longest_word(text: Text) -> int:
    return max((Text(word).cell_len for word in text.plain.split(" ")), default=0)


def wrap_words(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters between words (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and Text(f"{lines[-1]} {word}").cell_len <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


class FittedTable:
    """A table laid out for the width of the console that prints it (see the module's rule)."""

    def __init__(self, columns: Iterable[Col], *, title: str | None = None, caption: str | None = None,
                 wide: bool = False, show_header: bool = True):
        self.columns = list(columns)
        self.title, self.caption, self.wide, self.show_header = title, caption, wide, show_header
        self.rows: list[_Row] = []

    def add_row(self, *cells: str | Text, style: str | None = None) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(_Row([one_line(cell) for cell in cells], style))

    def add_section(self) -> None:
        """A break (an empty line) after the last row added."""
        if self.rows:
            self.rows[-1].end_section = True

    # ------------------------------------------------------------------ layout

    def natural(self, index: int) -> int:
        """The whole width of a column: its header or its widest cell, each on one line."""
        return max(self._header_width(index), self._cells_width(index))

    def least(self, index: int) -> int:
        """The least width a column may have beside other columns (a header may wrap between words)."""
        column = self.columns[index]
        if column.role == WRAP:
            return self._floor(index)
        if column.role == OPTIONAL and column.min_width is not None:
            return min(self.natural(index), max(column.min_width, 1))
        return max(self._cells_width(index), self._header_word(index))

    def layout(self, width: int) -> list[list[Placed]]:
        """The tables to print on a page ``width`` characters wide, each a list of placed columns in order."""
        if self.wide:
            return [[Placed(i, self.natural(i), "whole") for i in range(len(self.columns))]]
        keys = [i for i, c in enumerate(self.columns) if c.role == KEY]
        first = [i for i, c in enumerate(self.columns) if c.role in (ESSENTIAL, WRAP)]
        rest = [i for i, c in enumerate(self.columns) if c.role == OPTIONAL]
        waiting = first + rest
        tables = []
        while True:
            widths = {i: self.least(i) for i in keys}
            used = sum(widths.values()) + GAP * (len(keys) - 1)
            deferred = []
            for index in waiting:
                need = self.least(index) + (GAP if widths else 0)
                if used + need <= width:
                    widths[index] = self.least(index)
                    used += need
                else:
                    deferred.append(index)
            if deferred and len(widths) == len(keys):  # fits beside nothing: a table of its own, shortened
                index = deferred.pop(0)
                widths[index] = max(width - used - (GAP if widths else 0), self._floor(index))
                used += widths[index] + (GAP if len(widths) > 1 else 0)
            used += self._share(widths, width - used)
            order = sorted(widths, key=lambda i: (i not in keys, i))  # the keys at the left, then as given
            tables.append([Placed(i, widths[i], self._mode(i, widths[i])) for i in order])
            if not deferred:
                return tables
            waiting = deferred

    def _share(self, widths: dict[int, int], room: int) -> int:
        """Give ``room`` to the columns narrower than their whole width, a character each in turn; the width given."""
        given = 0
        while given < room:
            short = [i for i in widths if widths[i] < self.natural(i)]
            for index in short[:room - given]:
                widths[index] += 1
                given += 1
            if not short:
                break
        return given

    def _cells_width(self, index: int) -> int:
        return max((row.cells[index].cell_len for row in self.rows), default=0)

    def _header_width(self, index: int) -> int:
        return Text(self.columns[index].header).cell_len if self.show_header else 0

    def _header_word(self, index: int) -> int:
        return longest_word(Text(self.columns[index].header)) if self.show_header else 0

    def _floor(self, index: int) -> int:
        """The least width of a column on a table of its own: a few characters (optional, ellipsized), its
        longest word (wrapping) or its whole cells (key and essential)."""
        role, natural = self.columns[index].role, self.natural(index)
        if role == OPTIONAL:
            return min(natural, NARROWEST)
        if role != WRAP:
            return self.least(index)
        words = [longest_word(row.cells[index]) for row in self.rows]
        return min(natural, max([self._header_word(index), *words, 1]))

    def _mode(self, index: int, width: int) -> str:
        if width >= self._cells_width(index):
            return "whole"
        return "ellipsis" if self.columns[index].role == OPTIONAL else "wrap"

    # ------------------------------------------------------------------ rendering

    def tables(self, width: int) -> list[Table]:
        """The rich tables of :meth:`layout`, each exactly as wide as its columns."""
        return [self._table(placed) for placed in self.layout(width)]

    def _table(self, placed: list[Placed]) -> Table:
        total = sum(p.width for p in placed) + GAP * (len(placed) - 1)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), pad_edge=False,
                      show_header=self.show_header, header_style="bold", width=total)
        for p in placed:
            column = self.columns[p.index]
            table.add_column(wrap_words(column.header, p.width), justify=column.justify, width=p.width,
                             no_wrap=p.mode != "wrap", overflow="fold" if p.mode == "wrap" else "ellipsis",
                             header_style=column.header_style)
        for row in self.rows:
            table.add_row(*(row.cells[p.index] for p in placed), style=row.style, end_section=row.end_section)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.title:
            yield self._prose(self.title, "table.title", options.max_width)
        for number, table in enumerate(self.tables(options.max_width)):
            if number:
                yield Text("")
            yield table
        if self.caption:
            yield self._prose(self.caption, "table.caption", options.max_width)

    def _prose(self, text: str, style: str, width: int) -> Text:
        """A title or caption, wrapped between words to the page (wide: not wrapped); a longer word stays whole."""
        if not self.wide:
            text = "\n".join(wrap_words(line, width) for line in text.split("\n"))
        return Text(text, style=style, no_wrap=True, overflow="ignore")
