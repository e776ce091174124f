"""Training throughput: the whole pipeline (memory-mapped volumes, patch sampling, augmentation,
DataLoader workers) against the model alone on a batch already in memory.

    .venv/bin/python benchmarks/train.py [--experiment experiments/quick/unet25d.toml] [--iterations 20]
                                         [--rounds 9] [--skeleton on|off] [--set KEY=VALUE] [--summary FILE]

Prints samples/s of both and their ratio (target: at least 0.9, i.e. the loader never starves
the model). The loader runs as ``train.workers`` says (``--workers``; auto: in the training
process on the CPU, where worker processes would stall the model's threads). Both run the same
train_step (forward, loss, backward, optimizer step). The augmentation is the experiment's
``[data.augment]`` (the defaults for the quick experiments). A loss term that takes skeleton
targets (``skeleton_recall``) makes every batch carry them, cropped from each volume's cached
targets and augmented with the label (the model-alone step gets them from memory too);
``--skeleton on`` or ``off`` adds or removes such a term.

Before timing, the loader's prefetched batches are used up, so the pipeline is measured in its
steady state rather than on batches made while the first step ran. Each timed round runs the
pipeline, then the model alone right after it, and the ratio is the median of the rounds' ratios
(the samples/s shown are medians too): a shared machine whose speed drifts from second to second
then moves both sides of each ratio together. The CPU time of the loader's workers and of the
model's step per batch are printed too: when the model keeps every core busy, the ratio tends to
model / (model + loader) of those.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import _summary
import torch
from rich.console import Console
from rich.table import Table

from vesuvius_lab.core.config.experiment import load_experiment
from vesuvius_lab.core.config.project import load_project
from vesuvius_lab.core.config.spec import LossTerm
from vesuvius_lab.core.data.sampling import split_targets
from vesuvius_lab.core.data.split import make_split
from vesuvius_lab.core.data.synthetic import write_dataset
from vesuvius_lab.core.runs.folder import new_run
from vesuvius_lab.core.training.trainer import Setup, Trainer

#: The loss that takes skeleton targets from the loader.
SKELETON_LOSS = "skeleton_recall"


def skeleton_terms(spec, choice: str | None):
    """The experiment with a skeleton-recall loss term added (``on``) or removed (``off``): such a term
    makes the trainer ask its loader for skeleton targets."""
    terms = list(spec.loss)
    if choice == "on" and not any(term.plugin == SKELETON_LOSS for term in terms):
        terms.append(LossTerm.model_validate({"plugin": SKELETON_LOSS, "weight": 1.0}))
    elif choice == "off":
        terms = [term for term in terms if term.plugin != SKELETON_LOSS]
    return spec.model_copy(update={"loss": terms})


def worker_cpu_seconds(batches) -> float:
    """CPU seconds the DataLoader's worker processes have used so far (from /proc; nan elsewhere)."""
    total = 0.0
    for worker in batches.workers:
        try:
            fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/quick/unet25d.toml")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds, each the pipeline then the model alone")
    parser.add_argument("--workers", default="auto", help="DataLoader workers: a number, or auto (as train.workers: "
                        "none on the CPU)")
    parser.add_argument("--skeleton", choices=("on", "off"), help="add (on) or remove (off) a skeleton_recall "
                        "loss term, whose skeleton targets the loader workers compute; default: as the experiment")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the experiment, as vlab's --set (e.g. data.augment.elastic=0)")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), help="synthetic volume shape")
    _summary.add_argument(parser)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data", n=6, shape=tuple(args.shape), seed=0, scrolls=3, n_test=1,
                             progress=False)
        project = load_project().with_overrides(data=str(data), runs=str(Path(tmp) / "runs"), device="cpu")
        loaded = load_experiment(args.experiment, [f"train.iterations_per_epoch={args.iterations}",
                                                   f"train.workers={args.workers if args.workers.isdigit() else repr(args.workers)}", "train.grad_accum=1",
                                                   "data.folds=3", *args.set])
        spec = project.resolve(skeleton_terms(loaded.spec, args.skeleton))
        run = new_run(project.runs_dir, spec.name, spec.data.fold)
        setup = Setup(spec, run.path, project.runs_dir, project.cache_dir, "cpu", make_split(spec), resume=False)
        trainer = Trainer(setup, 0, 1, "cpu")
        batches = trainer.batches(start_epoch=0)
        image, targets = next(batches)  # warm-up: workers started, first-call allocations and kernels
        batch = (image, *split_targets(targets))
        trainer.train_step(*batch)
        for _ in range(batches.prefetched + 1):  # the batches made during warm-up are gone
            image, targets = next(batches)
            trainer.train_step(image, *split_targets(targets))
        pipelines, alones, ratios, loader_cpus, model_cpus = [], [], [], [], []
        for _ in range(args.rounds):  # each round: the pipeline, then the model alone right after it
            before = worker_cpu_seconds(batches)
            pipelines.append(trainer._train_epoch(0, batches)["samples_per_s"])
            loader_cpus.append((worker_cpu_seconds(batches) - before) / args.iterations)
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.iterations):
                trainer.train_step(*batch)
            alones.append(args.iterations * spec.train.batch_size / (time.perf_counter() - started))
            model_cpus.append((time.process_time() - cpu) / args.iterations)
            ratios.append(pipelines[-1] / alones[-1])
        pipeline, alone, ratio = statistics.median(pipelines), statistics.median(alones), statistics.median(ratios)
        loader_cpu, model_cpu = statistics.median(loader_cpus), statistics.median(model_cpus)
        worker_count = len(batches.workers)  # 0: the loader's time is inside the pipeline's steps
    skeletons = batch[2] is not None
    targets = "with skeleton targets" if skeletons else "no skeleton targets"
    table = Table(title=f"training throughput: {spec.name}, window {tuple(spec.data.window)}, batch "
                        f"{spec.train.batch_size}, {worker_count} loader workers, "
                        f"torch threads {torch.get_num_threads()}, "
                        f"{targets}")
    for column in ("pipeline samples/s", "model alone samples/s", "ratio (target >= 0.9)", "loader CPU ms/batch",
                   "model CPU ms/batch", "model / (model + loader) CPU"):
        table.add_column(column, justify="right")
    table.add_row(f"{pipeline:.2f}", f"{alone:.2f}", f"{ratio:.3f}",
                  f"{1000 * loader_cpu:.1f}" if worker_count else "in the steps", f"{1000 * model_cpu:.1f}",
                  f"{model_cpu / (model_cpu + loader_cpu):.3f}" if worker_count else "-")
    console.print(table)
    _summary.write(args.summary, [_summary.row(
        "train", f"training samples/s, {spec.name}, window {'x'.join(map(str, spec.data.window))}"
                 + (", skeleton targets" if skeletons else ""), pipeline,
        "samples/s", peer=alone, peer_name="model alone, batch in memory", ratio=ratio, target=">= 0.9",
        note=f"batch {spec.train.batch_size}, {worker_count} loader workers, {args.iterations} iterations, median of "
             f"{args.rounds} paired rounds, volumes {'x'.join(map(str, args.shape))}; CPU per batch: loader "
             f"{1000 * loader_cpu:.1f} ms, model {1000 * model_cpu:.1f} ms"
             + (f", --set {' '.join(args.set)}" if args.set else ", the experiment's augmentation"))])


if __name__ == "__main__":
    main()
