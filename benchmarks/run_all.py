"""Run every benchmark and write one table of the results.

Each benchmark script runs as a subprocess of this Python with ``--summary FILE`` and the sizes
below, one after the other, with ``OMP_NUM_THREADS`` as in this environment (1 when unset, or
``--threads``). Their rows go into one Markdown table (benchmark, measure, ours, peer, ratio,
target, note), headed by the machine it was measured on and the command that reproduces it, and
are printed with rich. A benchmark that fails or runs past ``--timeout`` is a "failed" row with
the last line of its error, and the others still run.

    .venv/bin/python benchmarks/run_all.py                   # the full run (~10 minutes on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick           # a smoke run with smaller sizes (minutes)
    .venv/bin/python benchmarks/run_all.py --only metric inference --output /tmp/results.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Script arguments of each benchmark: (full run, quick run). The full run is each script's own
# defaults (320^3 volumes, competition size), spelled out; about 10 minutes on two cores.
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "metric": (["--size", "320", "--repeat", "3"], ["--size", "128", "--repeat", "1"]),
    "inference": (["--size", "320", "--repeats", "1"], ["--size", "128", "--repeats", "1"]),
    "train": (["--iterations", "20"], ["--iterations", "5"]),
    "models": (["--device", "cpu", "--steps", "3", "--warmup", "1"],
               ["--device", "cpu", "--steps", "1", "--warmup", "1"]),
    "nnunet": (["--n", "6", "--side", "48", "--epochs", "2", "--iterations", "5", "--repeats", "2"],
               ["--n", "4", "--side", "32", "--epochs", "1", "--iterations", "2", "--repeats", "1"]),
    "postprocess": (["--size", "320", "--repeats", "2"], ["--size", "128", "--repeats", "1"]),
    "tune": (["--size", "320", "--repeats", "2"], ["--size", "128", "--repeats", "1"]),
    "ensemble_memory": (["--size", "320", "--members", "5"], ["--size", "128", "--members", "5"]),
}
COLUMNS = ("benchmark", "measure", "ours", "peer", "ratio", "target", "note")


def machine() -> str:
    """CPU model, cores, RAM and the versions that matter, on one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 2**20:.0f} GiB"
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for package in ("torch", "monai", "nnunetv2", "numpy"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return f"{cpu}, {cores} cores, {ram} RAM, Python {platform.python_version()}, " + ", ".join(versions)


def command_line() -> str:
    """The command that was run, as it could be typed again from the repository root."""
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    words = [str(python), *sys.argv]
    prefix = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return prefix + shlex.join(words)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run(name: str, arguments: list[str], threads: str, timeout: float, console: Console,
        verbose: bool) -> tuple[list[dict], float]:
    """Run one benchmark script; its summary rows, or one "failed" row, and its wall seconds."""
    with tempfile.TemporaryDirectory() as folder:
        summary = Path(folder) / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), *arguments, "--summary", str(summary)]
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        started = time.perf_counter()
        error = None
        # A session of its own, so that a timeout also ends the benchmark's worker processes.
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            if process.returncode != 0:
                error = last_line(stderr or stdout)
            elif not summary.exists():
                error = "wrote no summary"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            error = f"timed out after {timeout:.0f} s"
        output = stdout + stderr
        seconds = time.perf_counter() - started
        if verbose:
            console.rule(f"{name} {shlex.join(arguments)}")
            console.out(output, highlight=False)
        if error is None:
            try:
                return json.loads(summary.read_text()), seconds
            except (OSError, ValueError) as exc:
                error = f"unreadable summary: {exc}"
    return [{"benchmark": name, "measure": "failed", "ours": None, "peer": None, "peer_name": None, "ratio": None,
             "unit": "", "target": None, "note": error}], seconds


def number(value: float | None) -> str:
    if value is None:
        return ""
    size = abs(value)
    if size == 0:
        return "0"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def with_unit(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    return number(value) + ("" if unit == "%" else " ") + unit if unit else number(value)


def cells(row: dict) -> list[str]:
    """The table's columns of one summary row, as text."""
    if row.get("measure") == "failed" and row.get("ours") is None:
        return [row["benchmark"], "failed", "failed", "", "", "", row.get("note") or ""]
    unit = row.get("unit") or ""
    peer = with_unit(row.get("peer"), unit)
    if row.get("peer_name"):
        peer = f"{peer} ({row['peer_name']})" if peer else f"not timed ({row['peer_name']})"
    ratio = row.get("ratio")
    return [row["benchmark"], row["measure"], with_unit(row.get("ours"), unit) or "-", peer,
            f"{ratio:.3g}" if ratio is not None else "", row.get("target") or "", row.get("note") or ""]


def markdown(rows: list[dict], header: list[str]) -> str:
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run of a few minutes")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="the Markdown file to write")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--threads", default=os.environ.get("OMP_NUM_THREADS", "1"),
                        help="OMP_NUM_THREADS of the benchmarks (default: this environment's, else 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds after which a benchmark counts as failed")
    parser.add_argument("--verbose", action="store_true", help="also print each benchmark's own output")
    args = parser.parse_args()
    console = Console(width=max(Console().width, 160))
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = command_line()
    host = machine()

    rows: list[dict] = []
    walls: dict[str, float] = {}
    started = time.perf_counter()
    for name in args.only or BENCHMARKS:
        arguments = BENCHMARKS[name][1 if args.quick else 0]
        console.print(f"running {name} {shlex.join(arguments)} ...")
        found, walls[name] = run(name, arguments, args.threads, args.timeout, console, args.verbose)
        failed = found and found[0]["measure"] == "failed"
        outcome = f"[red]failed[/red]: {escape(found[0]['note'])}" if failed else f"{len(found)} rows"
        console.print(f"  {name}: {outcome} in {walls[name]:.0f} s")
        rows += found
    total = time.perf_counter() - started

    mode = ("**Quick run** (smaller sizes than the full run; a smoke test, not the reference figures)"
            if args.quick else "Full run")
    header = [
        "# Benchmarks",
        "",
        f"Measured on: {host}; OMP_NUM_THREADS={args.threads}; {date}.",
        "",
        f"Command: `{command}`",
        "",
        f"{mode}, {total / 60:.1f} minutes in all ("
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items()) + "). Arguments: "
        + "; ".join(f"`{name}.py {shlex.join(BENCHMARKS[name][1 if args.quick else 0])}`" for name in walls) + ".",
        "",
        "ratio = ours / peer (for times, below 1 means ours is faster); train's peer is the model alone on a "
        "batch in memory. Times are wall-clock seconds unless marked CPU; the machine may be shared, so "
        "compare CPU seconds and repeats before trusting a few percent.",
    ]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown(rows, header))

    table = Table(title=f"benchmarks ({'quick run' if args.quick else 'full run'}), {total / 60:.1f} min",
                  title_justify="left", caption=f"{host}\n{command}", caption_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in {"ours", "ratio"} else "left",
                         overflow="fold")
    for row in rows:
        texts = cells(row)
        table.add_row(*(escape(text) for text in texts), style="red" if texts[1] == "failed" else None)
    console.print(table)
    console.print(f"written to {output}")


if __name__ == "__main__":
    main()
