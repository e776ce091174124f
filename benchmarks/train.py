"""Training throughput: the whole pipeline (memory-mapped volumes, patch sampling, augmentation,
DataLoader workers) against the model alone on a batch already in memory.

    .venv/bin/python benchmarks/train.py [--experiment experiments/quick/unet25d.toml] [--iterations 20] [--summary FILE]

Prints samples/s of both and their ratio (target: at least 0.9, i.e. the loader never starves
the model). Both run the same train_step (forward, loss, backward, optimizer step).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _summary
import torch
from rich.console import Console
from rich.table import Table

from vesuvius_lab.core.config.experiment import load_experiment
from vesuvius_lab.core.config.project import load_project
from vesuvius_lab.core.data.split import make_split
from vesuvius_lab.core.data.synthetic import write_dataset
from vesuvius_lab.core.runs.folder import new_run
from vesuvius_lab.core.training.trainer import Setup, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/quick/unet25d.toml")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), help="synthetic volume shape")
    _summary.add_argument(parser)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data", n=6, shape=tuple(args.shape), seed=0, scrolls=3, n_test=1,
                             progress=False)
        project = load_project().with_overrides(data=str(data), runs=str(Path(tmp) / "runs"), device="cpu")
        loaded = load_experiment(args.experiment, [f"train.iterations_per_epoch={args.iterations}",
                                                   f"train.workers={args.workers}", "train.grad_accum=1",
                                                   "data.folds=3"])
        spec = project.resolve(loaded.spec)
        run = new_run(project.runs_dir, spec.name, spec.data.fold)
        setup = Setup(spec, run.path, project.runs_dir, project.cache_dir, "cpu", make_split(spec), resume=False)
        trainer = Trainer(setup, 0, 1, "cpu")
        batches = trainer.batches(start_epoch=0)
        image, label = next(batches)  # warm-up: workers started, first-call allocations and kernels
        trainer.train_step(image, label)
        pipeline = trainer._train_epoch(0, batches)["samples_per_s"]
        started = time.perf_counter()
        for _ in range(args.iterations):
            trainer.train_step(image, label)
        alone = args.iterations * spec.train.batch_size / (time.perf_counter() - started)
    table = Table(title=f"training throughput: {spec.name}, window {tuple(spec.data.window)}, batch "
                        f"{spec.train.batch_size}, {args.workers} workers, torch threads {torch.get_num_threads()}")
    for column in ("pipeline samples/s", "model alone samples/s", "ratio (target >= 0.9)"):
        table.add_column(column, justify="right")
    table.add_row(f"{pipeline:.2f}", f"{alone:.2f}", f"{pipeline / alone:.3f}")
    console.print(table)
    _summary.write(args.summary, [_summary.row(
        "train", f"training samples/s, {spec.name}, window {'x'.join(map(str, spec.data.window))}", pipeline,
        "samples/s", peer=alone, peer_name="model alone, batch in memory", target=">= 0.9",
        note=f"batch {spec.train.batch_size}, {args.workers} workers, {args.iterations} iterations, "
             f"volumes {'x'.join(map(str, args.shape))}")])


if __name__ == "__main__":
    main()
