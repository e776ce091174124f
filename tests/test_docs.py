"""The documentation: every `vlab` command shown in README.md and docs/*.md parses with the real
command line, the cheap ones run, every relative link points at a file, and the README stays short.

A command is a line of a fenced shell block (```bash, ```sh, ```console or no language) that
starts with `vlab ` (after an optional `$ ` prompt and `NAME=value` assignments, `\\` continuations
joined, comments dropped), or runs `-m vesuvius_lab`. Every one is parsed down to its subcommand,
so an unknown subcommand or option, a missing argument or a bad value fails with the page and
line. The commands that need no trained run (RUNNABLE) also run, in the order the pages show
them, in a copy of the project's experiment files in a temporary folder.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from vesuvius_lab.cli import cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 8192  # bytes: the README is read in five minutes; reference material is in docs/

SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
#: Subcommands that need no trained run and take seconds: these documented commands are run.
RUNNABLE = {(), ("plugins",), ("plugins", "show"), ("validate",), ("schema",), ("data", "synth"), ("data", "check")}
HELP_FLAGS = {"-h", "--help", "--version"}
#: What the run commands may read, copied into the temporary project (they must not write into the repo).
PROJECT_FILES = ("vesuvius.toml", "experiments", "examples")

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    """A documented `vlab` command: where it is, as written, and its arguments after `vlab`."""

    page: Path
    line: int
    text: str
    args: tuple[str, ...] | None  # None: the line could not be split like a shell would
    error: str = ""

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def runnable(self) -> bool:
        if self.args is None:
            return False
        return bool(HELP_FLAGS & set(self.args)) or subcommand_path(self.args, resilient=True) in RUNNABLE


def markdown_lines(page: Path):
    """(line number, text, language) of a Markdown page's lines, fence lines left out: language is
    the info word of the fenced block a line is in ("" for none), None outside fenced blocks."""
    fence, language = None, None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            opening = FENCE.match(line)
            if opening:
                fence, language = opening.group(1), opening.group(2).lower()
            else:
                yield number, line, None
        elif stripped.startswith(fence) and not stripped.strip(fence[0]):
            fence, language = None, None
        else:
            yield number, line, language


def shell_commands(page: Path):
    """(first line number, text) of each command in the fenced shell blocks of a Markdown page,
    `$ ` prompts dropped and `\\` continuations joined; in ```console blocks only prompted lines
    (and their continuations) are commands, the rest is output."""
    pending, start = "", 0
    for number, line, language in markdown_lines(page):
        if language not in SHELL_LANGUAGES:
            continue
        text = line.strip()
        if not pending:
            if language == "console" and not text.startswith("$ "):
                continue
            start, text = number, text.removeprefix("$ ")
        if text.endswith("\\") and not text.startswith("#"):
            pending += text[:-1] + " "
            continue
        yield start, pending + text
        pending = ""
    if pending:
        yield start, pending


def vlab_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments after `vlab` (or `-m vesuvius_lab`), or None when the command is not vlab's."""
    while tokens and ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if tokens and tokens[0] == "vlab":
        return tokens[1:]
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "vesuvius_lab":
            return tokens[i + 2:]
    return None


def collect_commands() -> list[Command]:
    commands = []
    for page in PAGES:
        for line, text in shell_commands(page):
            if text.lstrip().startswith("#"):
                continue
            try:
                args = vlab_arguments(shlex.split(text, comments=True))
            except ValueError as exc:  # unbalanced quotes
                if re.match(r"\s*([A-Za-z_]\w*=\S*\s+)*vlab\s", text):
                    commands.append(Command(page, line, text, None, f"cannot be split like a shell would: {exc}"))
                continue
            if args is not None:
                commands.append(Command(page, line, text, tuple(args)))
    return commands


def subcommand_path(args, *, resilient: bool = False) -> tuple[str, ...]:
    """Parse ``vlab ARGS`` with the real command group down to the subcommand, invoking nothing;
    return the subcommand names. Raises click's errors (unknown command or option, missing or bad
    argument) unless ``resilient``; help and --version end the parse (click.exceptions.Exit)."""
    ctx = cli.make_context("vlab", list(args), resilient_parsing=resilient)
    path: tuple[str, ...] = ()
    while isinstance(ctx.command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]  # click < 9 keeps the command name apart
        if not rest:
            if not ctx.command.invoke_without_command and not resilient:
                raise click.UsageError("Missing command.", ctx)
            break
        name, command, remaining = ctx.command.resolve_command(ctx, rest)
        if command is None:  # resilient parsing of an unknown command: a path that is no command's
            return (*path, rest[0])
        ctx = command.make_context(name, remaining, parent=ctx, resilient_parsing=resilient)
        path += (name,)
    return path


COMMANDS = collect_commands()
RUN = [command for command in COMMANDS if command.runnable]


def test_the_pages_show_commands():
    """The collector finds the commands (a broken fence or prompt rule would silently test nothing)."""
    assert len(COMMANDS) >= 20, [str(c) for c in COMMANDS]
    shown = {tuple(c.args[:2]) for c in RUN}
    assert {("data", "synth"), ("data", "check")} <= shown and any(c.args[:1] == ("validate",) for c in RUN)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_parses(command: Command, monkeypatch):
    assert command.args is not None, f"{command}: `{command.text}` {command.error}"
    monkeypatch.chdir(REPO)  # relative paths as the pages mean them (click only reads, never writes)
    try:
        subcommand_path(command.args)
    except click.exceptions.Exit as exc:  # --help, --version
        assert exc.exit_code == 0, f"{command}: `{command.text}` exits with {exc.exit_code}"
    except click.ClickException as exc:
        pytest.fail(f"{command}: `{command.text}` is not a valid vlab command: {exc.format_message()}")


class DocsProject:
    """A temporary copy of the project's experiment files where the runnable commands run, in the
    order the pages show them (a command runs after every one before it: `data check` reads what
    `data synth` wrote)."""

    def __init__(self, root: Path):
        self.root = root
        for name in PROJECT_FILES:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            elif source.is_file():
                shutil.copy2(source, root / name)
        vlab = Path(sys.executable).parent / "vlab"
        self.vlab = [str(vlab)] if vlab.exists() else [sys.executable, "-m", "vesuvius_lab"]
        self.env = {key: value for key, value in os.environ.items() if key not in ("VLAB_DATA", "VLAB_RUNS")}
        self.env["COLUMNS"] = "160"
        self.results: dict[int, subprocess.CompletedProcess] = {}

    def expand(self, argument: str) -> list[str]:
        """A shell's pathname expansion, relative to the project (no match: the word as written)."""
        if not any(char in argument for char in "*?["):
            return [argument]
        return sorted(glob.glob(argument, root_dir=self.root)) or [argument]

    def result(self, index: int) -> subprocess.CompletedProcess:
        for i in range(index + 1):
            if i not in self.results:
                args = [word for argument in RUN[i].args for word in self.expand(argument)]
                self.results[i] = subprocess.run([*self.vlab, *args], cwd=self.root, env=self.env,
                                                 capture_output=True, text=True, timeout=120)
        return self.results[index]


@pytest.fixture(scope="module")
def docs_project(tmp_path_factory) -> DocsProject:
    return DocsProject(tmp_path_factory.mktemp("docs-project"))


@pytest.mark.parametrize("index", range(len(RUN)), ids=[str(c) for c in RUN])
def test_cheap_documented_command_runs(index: int, docs_project: DocsProject):
    command, result = RUN[index], docs_project.result(index)
    assert result.returncode == 0, (f"{command}: `{command.text}` exited with {result.returncode}\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def test_readme_starts_with_the_two_setup_commands_and_stays_short():
    first_block = [text for _, text in shell_commands(README)][:2]
    assert [text.split("#")[0].strip() for text in first_block] == ["make demo", "make test"]
    size = README.stat().st_size
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} and move detail to docs/"


# --------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    found = set()
    for _, line, language in markdown_lines(page):
        heading = re.match(r"#{1,6}\s+(.*)", line) if language is None else None
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_relative_links_point_at_existing_files():
    broken = []
    for page in PAGES:
        for number, line, language in markdown_lines(page):
            line = re.sub(r"`[^`]*`", "", line) if language is None else ""  # no links in code
            for target in LINK.findall(line) + REFERENCE.findall(line):
                if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # https:, mailto:, ...
                    continue
                path_part, _, fragment = target.partition("#")
                path = (page.parent / path_part.split("?")[0]).resolve() if path_part else page
                where = f"{page.relative_to(REPO)}:{number}: {target}"
                if not path.exists():
                    broken.append(f"{where} (no such file)")
                elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                    broken.append(f"{where} (no heading #{fragment} in {path.name})")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)
