"""The ``vlab`` command: argument parsing and printing only; the work happens in ``core``.

Heavy libraries (torch, MONAI, nnU-Net) are imported inside the commands that need them, so
``vlab --help``, ``vlab validate`` and ``vlab plugins`` stay fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from vesuvius_lab import __version__
from vesuvius_lab.core.errors import UserError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

SET_HELP = "Override any experiment key, e.g. --set train.epochs=3 (the value is read as TOML)."


class ProjectContext:
    """What the group-level options choose: the project file and command-line overrides."""

    def __init__(self, project_file: str | None, data: str | None, runs: str | None, device: str | None):
        self.project_file, self.data, self.runs, self.device = project_file, data, runs, device

    def project(self):
        from vesuvius_lab.core.project import load_project

        project = load_project(Path(self.project_file) if self.project_file else None)
        return project.with_overrides(data=self.data, runs=self.runs, device=self.device)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vlab")
@click.option("--project", "project_file", type=click.Path(dir_okay=False),
              help="Project settings file (default: the nearest vesuvius.toml above the working directory).")
@click.option("--data", help="Data root (beats VLAB_DATA, the experiment and vesuvius.toml).")
@click.option("--runs", help="Runs directory (beats VLAB_RUNS and vesuvius.toml).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Compute device.")
@click.pass_context
def cli(ctx: click.Context, project_file, data, runs, device):
    """vesuvius-lab: declarative experiments for 3D papyrus surface segmentation."""
    ctx.obj = ProjectContext(project_file, data, runs, device)


# --------------------------------------------------------------------------- experiments


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--quiet", "-q", is_flag=True, help="Print problems only.")
def validate(files, overrides, quiet):
    """Check experiment files: every problem of every file, with file, line and key path."""
    from vesuvius_lab.core.experiment import validate_files

    loaded, problems = validate_files(list(files), list(overrides))
    if not quiet:
        for item in loaded:
            out.print(f"[green]ok[/]  {item.file}  ({item.spec.name}: model {item.spec.model.plugin})")
    if problems:
        for problem in problems:
            err.print(f"[bold red]error[/] {_escape(str(problem))}")
        err.print(f"{len(problems)} problem(s) in {len({p.file for p in problems})} file(s).")
        sys.exit(2)


@cli.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
def schema(output):
    """Print the JSON Schema of experiment files (for Taplo / Even Better TOML)."""
    from vesuvius_lab.core.spec import Experiment

    text = json.dumps(Experiment.model_json_schema(), indent=2)
    if output:
        from vesuvius_lab.core.files import write_text_atomic

        write_text_atomic(Path(output), text + "\n")
        err.print(f"wrote {output}")
    else:
        click.echo(text)


# --------------------------------------------------------------------------- plugins


@cli.group(invoke_without_command=True)
@click.option("--group", "group", help="Only this group: models, losses, blenders, postprocessors.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
@click.pass_context
def plugins(ctx, group, as_json):
    """List the installed plugins (built-in and third-party) and whether each one loads."""
    if ctx.invoked_subcommand:
        return
    from dataclasses import asdict

    from vesuvius_lab.core import registry

    rows = registry.describe(group)
    if as_json:
        keys = ("group", "name", "package", "version", "status", "summary")
        click.echo(json.dumps([{k: asdict(r)[k] for k in keys} for r in rows], indent=2))
        return
    table = Table(title="vesuvius-lab plugins", title_justify="left")
    for column in ("group", "name", "package", "status", "summary"):
        table.add_column(column, overflow="fold")
    for row in rows:
        status = "[green]ok[/]" if row.status == "ok" else f"[red]{_escape(row.status)}[/]"
        table.add_row(row.group, row.name, f"{row.package} {row.version}", status, _escape(row.summary))
    out.print(table)


@plugins.command("show")
@click.argument("group")
@click.argument("name")
def plugins_show(group, name):
    """Show a plugin's params with their types, defaults and help."""
    from vesuvius_lab.core import registry

    found = registry.load(group, name)
    out.print(f"[bold]{registry.group_name(group)} / {name}[/]  {_escape(found.summary)}")
    table = Table("param", "type", "default", "help")
    for field_name, info in found.Params.model_fields.items():
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        table.add_row(field_name, _type_name(info.annotation), _escape(default), _escape(info.description or ""))
    out.print(table if found.Params.model_fields else "  (no params)")


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run ``vlab``; a user's mistake prints one clear message and exits with status 2."""
    try:
        cli.main(args=argv, prog_name="vlab", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {_escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
