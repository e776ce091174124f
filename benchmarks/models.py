"""Training throughput and peak memory of every model plugin, at its experiments' windows.

For each experiment file (experiments/quick/*.toml; with --full also experiments/*.toml) whose
model is a torch module, one training step is: forward on a random batch of the experiment's
window and batch size, the experiment's own weighted losses, backward, AdamW step; under the
experiment's AMP setting on CUDA (bf16 for "auto"), in float32 on the CPU. After --warmup steps,
--steps steps are timed. Printed per experiment: parameters, seconds per step, samples per
second, and peak memory above what the process held before the model was built:

- CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the resident
  size before building, after freed heap memory is handed back to the OS (malloc_trim).
- CUDA: torch.cuda.max_memory_allocated above the allocation before building.

    OMP_NUM_THREADS=1 python benchmarks/models.py                  # quick experiments, one core
    python benchmarks/models.py --full --device cuda               # also the full-size ones
    python benchmarks/models.py --only smp_unet25d --steps 5
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import _summary
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from vesuvius_lab.core import registry
from vesuvius_lab.core.config.experiment import load_experiment
from vesuvius_lab.core.contract.models import count_parameters
from vesuvius_lab.core.training.objective import build_objective

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Row:
    experiment: str
    plugin: str
    window: tuple[int, int, int]
    batch: int
    parameters: int | None = None
    seconds_per_step: float | None = None
    peak_mib: float | None = None
    note: str = ""


def _status_kib(key: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory (MiB) above the level at ``start``: CUDA allocations or the process's RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        self.base = _status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return (_status_kib("VmHWM") * 1024 - self.base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def measure(path: Path, device: torch.device, warmup: int, steps: int) -> Row:
    """Build the experiment's model and objective and time ``steps`` training steps."""
    spec = load_experiment(path).spec
    window, batch = tuple(spec.data.window), spec.train.batch_size
    row = Row(str(path.relative_to(EXPERIMENTS)), spec.model.plugin, window, batch)

    def build():
        torch.manual_seed(0)
        return registry.build("models", spec.model.plugin, spec.model.params, window=window,
                              in_channels=1, out_channels=1)

    if not isinstance(build(), torch.nn.Module):  # this first build also pays for the imports
        row.note = "trains itself: not measured"
        return row
    memory = PeakMemory(device)
    memory.start()
    model = build()
    model = model.to(device).train()
    row.parameters = count_parameters(model)
    objective = build_objective(spec.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr)
    x = torch.rand(batch, 1, *window, device=device)
    target = (torch.rand(batch, 1, *window, device=device) < 0.1).float()
    valid = torch.rand(batch, 1, *window, device=device) < 0.7
    amp = _amp_dtype(spec.train.amp, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            total, _ = objective(model(x), target, valid,
                                 head_weights=getattr(model, "deep_supervision_weights", None))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    row.seconds_per_step = (time.perf_counter() - start) / steps
    row.peak_mib = memory.peak_mib()
    return row


def experiment_files(full: bool, only: list[str]) -> list[Path]:
    files = sorted((EXPERIMENTS / "quick").glob("*.toml"))
    if full:
        files += sorted(EXPERIMENTS.glob("*.toml"))
    models = {f: load_experiment(f).spec.model for f in files}  # an [ensemble] file has no model
    return [f for f, model in models.items() if model is not None and (not only or model.plugin in only)]


def table(rows: list[Row], device: torch.device) -> Table:
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    out = Table(title=f"Model plugins: one training step (forward, losses, backward, AdamW) on {device}{threads}",
                title_justify="left")
    for column in ("experiment", "plugin", "window", "batch", "params (M)", "s / step", "samples / s", "peak MiB", "note"):
        out.add_column(column, justify="left" if column in {"experiment", "plugin", "window", "note"} else "right")
    for r in rows:
        measured = r.seconds_per_step is not None
        out.add_row(r.experiment, r.plugin, "x".join(map(str, r.window)), str(r.batch),
                    f"{r.parameters / 1e6:.2f}" if r.parameters is not None else "-",
                    f"{r.seconds_per_step:.3f}" if measured else "-",
                    f"{r.batch / r.seconds_per_step:.2f}" if measured else "-",
                    f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-", r.note)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="Also the full-size experiments (experiments/*.toml).")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="Timed training steps per experiment.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--only", nargs="*", default=[], help="Only experiments using these model plugins.")
    _summary.add_argument(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    console = Console(width=max(Console().width, 150))  # the table stays readable in logs
    rows = []
    files = experiment_files(args.full, args.only)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=len(files))
        for path in files:
            progress.update(task, description=f"measuring {path.relative_to(EXPERIMENTS)}")
            try:
                rows.append(measure(path, device, args.warmup, args.steps))
            except torch.OutOfMemoryError:
                spec = load_experiment(path).spec
                rows.append(Row(str(path.relative_to(EXPERIMENTS)), spec.model.plugin, tuple(spec.data.window),
                                spec.train.batch_size, note="out of memory"))
                torch.cuda.empty_cache()
            progress.advance(task)
    console.print(table(rows, device))
    _summary.write(args.summary, [_summary.row(
        "models", f"{r.experiment} ({r.plugin}), window {'x'.join(map(str, r.window))}, batch {r.batch}",
        r.batch / r.seconds_per_step if r.seconds_per_step else None, "samples/s",
        note=(f"peak {r.peak_mib:.0f} MiB, {r.parameters / 1e6:.2f} M params, {r.seconds_per_step:.2f} s/step, "
              f"{device}" if r.seconds_per_step else r.note)) for r in rows])


if __name__ == "__main__":
    main()
