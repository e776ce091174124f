"""Training one fold with an nnU-Net trainer class, instantiated directly (no ``nnUNetv2_train``).

Epochs and iterations come from the experiment, not from the trainer class. A run that stopped
resumes from nnU-Net's ``checkpoint_latest.pth`` (written every 50 epochs, nnU-Net's default);
a run whose ``checkpoint_final.pth`` exists is not trained again. A fresh training with
``[train] init`` starts from those weights (nnU-Net's ``load_pretrained_weights``). With
``nproc > 1`` on CUDA, nnU-Net's own DDP training runs in ``nproc`` spawned processes (NCCL, one
GPU each); nnU-Net's DDP is CUDA-only, so on the CPU training runs in one process.

What nnU-Net prints goes to the run's ``backend/nnunet.log``; the run's log (and the console) gets
one line per epoch, as for every model: train loss, lr, samples/s, val loss and pseudo-Dice.
"""

from __future__ import annotations

import copy
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vesuvius_lab.plugins.nnunet.environment import forward_stdout, nnunet_environ, pool_size, to_output_file


@dataclass(frozen=True)
class TrainingSetup:
    """Everything a (possibly spawned) training process needs; plain data, so it pickles."""

    plans: dict
    configuration: str
    fold: int | str  # our fold number, or "all"
    dataset_json: dict
    trainer: str
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    preprocessed_view: Path  # nnUNet_preprocessed of this run: splits, plans, fingerprint
    preprocessed_data: Path  # the shared preprocessed volumes of the configuration
    results: Path  # nnUNet_results of this run
    seed: int
    workers: int
    augmentation_workers: int
    final_validation: bool = False
    save_probabilities: bool = False
    init: Path | None = None  # an nnU-Net checkpoint to start a fresh training from
    initial_lr: float | None = None  # None: the trainer's own
    momentum: float | None = None  # None: the trainer's own
    ema: float | None = None  # [train] ema: validate and save an average of the weights
    output_log: Path | None = None  # where nnU-Net's console output goes (None: the run's log)

    def environ(self):
        return nnunet_environ(preprocessed=self.preprocessed_view, results=self.results, workers=self.workers,
                              augmentation_workers=self.augmentation_workers)


def build_trainer(setup: TrainingSetup, device: Any, *, resume: bool = False) -> Any:
    """Instantiate the trainer class with our plans, fold and epoch counts (call inside ``setup.environ()``)."""
    import torch

    from vesuvius_lab.plugins.nnunet.trainers import trainer_class

    plans = copy.deepcopy(setup.plans)
    plans["continue_training"] = resume
    trainer = trainer_class(setup.trainer)(plans=plans, configuration=setup.configuration, fold=setup.fold,
                                           dataset_json=copy.deepcopy(setup.dataset_json),
                                           device=torch.device(device))
    trainer.num_epochs = setup.epochs
    trainer.num_iterations_per_epoch = setup.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = setup.val_iterations_per_epoch
    if setup.initial_lr is not None:
        trainer.initial_lr = setup.initial_lr  # read by configure_optimizers and the poly schedule
    if setup.momentum is not None:
        _override_momentum(trainer, setup.momentum)
    if setup.ema:
        from vesuvius_lab.plugins.nnunet.weight_average import add_weight_average

        add_weight_average(trainer, setup.ema)
    # The volumes live in the shared cache; splits and plans in this run's own folder.
    trainer.preprocessed_dataset_folder = str(setup.preprocessed_data)
    return trainer


def _override_momentum(trainer: Any, momentum: float) -> None:
    """Set the momentum of the optimiser the trainer's own ``configure_optimizers`` builds."""
    original = trainer.configure_optimizers

    def configure_optimizers():
        optimizer, scheduler = original()
        if not all("momentum" in group for group in optimizer.param_groups):
            from vesuvius_lab.core.errors import UserError

            raise UserError(f"params.momentum: the optimiser of {type(trainer).__name__} "
                            f"({type(optimizer).__name__}) has no momentum. Remove params.momentum or use an SGD "
                            "trainer such as nnUNetTrainer.")
        for group in optimizer.param_groups:
            group["momentum"] = momentum
        return optimizer, scheduler

    trainer.configure_optimizers = configure_optimizers  # an instance attribute: only this trainer


def results_folder(setup: TrainingSetup) -> Path:
    """nnU-Net's results folder of this training (``<Trainer>__<plans>__<configuration>``)."""
    from vesuvius_lab.plugins.nnunet.trainers import trainer_class

    trainer_name = trainer_class(setup.trainer).__name__
    return (Path(setup.results) / setup.plans["dataset_name"]
            / f"{trainer_name}__{setup.plans['plans_name']}__{setup.configuration}")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(setup: TrainingSetup, device: str, nproc: int, log: Callable[[str], None] = print) -> Path:
    """Train (or resume) one fold; return nnU-Net's results folder of the model."""
    if nproc > 1 and device == "cuda":
        return _train_ddp(setup, nproc, log)
    if nproc > 1:
        log(f"nnU-Net's multi-process training needs CUDA GPUs; training in 1 process on {device} instead of {nproc}.")
    with setup.environ(), forward_stdout(to_output_file(setup.output_log, log)):
        return _train_in_process(setup, device, log)


def _train_in_process(setup: TrainingSetup, device: str, log: Callable[[str], None], rank: int = 0) -> Path:
    results = results_folder(setup)
    fold = results / f"fold_{setup.fold}"
    final, latest = fold / "checkpoint_final.pth", fold / "checkpoint_latest.pth"
    if final.is_file() and not setup.final_validation:
        log(f"nnU-Net: {final} exists; training already finished.")
        return results
    seed_everything(setup.seed + rank)
    trainer = build_trainer(setup, device, resume=latest.is_file() and not final.is_file())
    if final.is_file():
        log(f"nnU-Net: {final} exists; training already finished.")
        trainer.load_checkpoint(str(final))
    else:
        if latest.is_file():
            trainer.load_checkpoint(str(latest))
            log(f"nnU-Net: resuming from epoch {trainer.current_epoch} ({latest})"
                + ("; [train] init applies only to a fresh start" if setup.init is not None else ""))
        elif setup.init is not None:
            _load_init(trainer, setup.init, fold / ".init_weights.pth", log if rank == 0 else _quiet)
        with _epoch_progress(trainer, log, enabled=rank == 0):
            trainer.run_training()
    if setup.final_validation:
        with pool_size(setup.workers):
            trainer.perform_actual_validation(setup.save_probabilities)
    return results


def _quiet(message: str) -> None:
    pass


def _load_init(trainer: Any, checkpoint: Path, scratch: Path, log: Callable[[str], None]) -> None:
    """Initialise the trainer's network from ``checkpoint`` as ``nnUNetv2_train -pretrained_weights`` does."""
    from vesuvius_lab.plugins.nnunet.pretrained import load_into

    if not trainer.was_initialized:
        trainer.initialize()
    scratch.parent.mkdir(parents=True, exist_ok=True)
    line = load_into(trainer.network, checkpoint, scratch)
    trainer.print_to_log_file(line, also_print_to_console=False)  # nnU-Net's own training log records it too
    log(line)


def epoch_line(trainer: Any, train_seconds: float) -> str:
    """One line per epoch, as the core's trainer prints for every model, from nnU-Net's logger."""
    logger = trainer.logger

    def last(key: str) -> float:
        return float(logger.get_value(key, step=-1))

    batch = trainer.configuration_manager.batch_size  # the global batch (nnU-Net splits it over DDP ranks)
    speed = trainer.num_iterations_per_epoch * batch / max(train_seconds, 1e-9)
    return (f"epoch {trainer.current_epoch}: loss {last('train_losses'):.4f}, lr {last('lrs'):.2e}, "
            f"{speed:.1f} samples/s, val loss {last('val_losses'):.4f}, pseudo-Dice {last('mean_fg_dice'):.4f}")


class _epoch_progress:
    """A rich progress bar over the training iterations, and one line per epoch in the log (rank 0 only)."""

    def __init__(self, trainer: Any, log: Callable[[str], None], enabled: bool = True):
        self.trainer, self.log, self.enabled = trainer, log, enabled

    def __enter__(self):
        if not self.enabled:
            return self
        import time

        from rich.progress import Progress

        from vesuvius_lab.core.console import err

        trainer = self.trainer
        iterations = trainer.num_iterations_per_epoch
        self.progress = Progress(*Progress.get_default_columns(), console=err, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)
        self.progress.start()
        task = self.progress.add_task("nnU-Net", total=trainer.num_epochs * iterations,
                                      completed=trainer.current_epoch * iterations)
        originals = trainer.on_train_epoch_start, trainer.on_train_epoch_end, trainer.train_step, trainer.on_epoch_end
        started = [0.0, 0.0]  # when the epoch's training began, how long it took

        def on_train_epoch_start() -> None:
            originals[0]()
            started[0] = time.perf_counter()
            self.progress.update(task, description=f"nnU-Net epoch {trainer.current_epoch + 1}/{trainer.num_epochs}")

        def on_train_epoch_end(outputs) -> None:
            started[1] = time.perf_counter() - started[0]
            originals[1](outputs)

        def train_step(batch: dict) -> dict:
            result = originals[2](batch)
            self.progress.advance(task)
            return result

        def on_epoch_end() -> None:
            originals[3]()  # counts the epoch: current_epoch is now the number of epochs done
            self.log(epoch_line(trainer, started[1]))
            _stop_if_asked(trainer)

        # Instance attributes: only this trainer is affected.
        trainer.on_train_epoch_start, trainer.on_train_epoch_end = on_train_epoch_start, on_train_epoch_end
        trainer.train_step, trainer.on_epoch_end = train_step, on_epoch_end
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()


def _stop_if_asked(trainer: Any) -> None:
    """The end of an epoch is where a stop signal is taken (core/interrupts.py): save the epoch as nnU-Net's
    latest checkpoint (nnU-Net itself saves one every 50 epochs), so that the resume continues from it."""
    from vesuvius_lab.core import interrupts

    if not interrupts.pending():
        return
    trainer.current_epoch -= 1  # save_checkpoint records current_epoch + 1, as when nnU-Net's on_epoch_end calls it
    try:
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_latest.pth"))
    finally:
        trainer.current_epoch += 1
    interrupts.check()


def _console_line(message: str) -> None:
    """A log line from a spawned DDP rank (its stdout goes to nnunet.log): onto the real console."""
    import sys

    print(message, file=sys.__stdout__, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_ddp(setup: TrainingSetup, nproc: int, log: Callable[[str], None]) -> Path:
    import torch
    import torch.multiprocessing as mp

    available = torch.cuda.device_count()
    if available < nproc:
        from vesuvius_lab.core.errors import UserError

        raise UserError(f"[train] nproc = {nproc}, but only {available} CUDA GPU(s) are visible. Lower nproc or "
                        "make more GPUs visible (CUDA_VISIBLE_DEVICES).")
    log(f"nnU-Net: DDP training on {nproc} GPUs (its output comes from the worker processes)")
    from vesuvius_lab.core import children
    from vesuvius_lab.plugins.nnunet.environment import scoped_environ

    with setup.environ(), scoped_environ(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT")
                                         or _free_port()):
        mp.spawn(children.adopted(_ddp_worker), args=(nproc, setup), nprocs=nproc, join=True)  # they end with us
    return results_folder(setup)


def _ddp_worker(rank: int, world_size: int, setup: TrainingSetup) -> None:
    """One DDP rank (spawned): NCCL process group, one GPU, nnU-Net's own DDP code paths."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.cuda.set_device(torch.device("cuda", rank))
    try:
        with forward_stdout(to_output_file(setup.output_log, print) if rank == 0 else _quiet):
            _train_in_process(setup, "cuda", _console_line, rank=rank)
    finally:
        dist.destroy_process_group()
