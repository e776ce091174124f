"""Training one fold with an nnU-Net trainer class, instantiated directly (no ``nnUNetv2_train``).

Epochs and iterations come from the experiment, not from the trainer class. A run that stopped
resumes from nnU-Net's ``checkpoint_latest.pth`` (written every 50 epochs, nnU-Net's default);
a run whose ``checkpoint_final.pth`` exists is not trained again. With ``nproc > 1`` on CUDA,
nnU-Net's own DDP training runs in ``nproc`` spawned processes (NCCL, one GPU each); nnU-Net's
DDP is CUDA-only, so on the CPU training runs in one process.
"""

from __future__ import annotations

import copy
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vesuvius_lab.plugins.nnunet.environment import forward_stdout, nnunet_environ, pool_size


@dataclass(frozen=True)
class TrainingSetup:
    """Everything a (possibly spawned) training process needs; plain data, so it pickles."""

    plans: dict
    configuration: str
    fold: int
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
    # The volumes live in the shared cache; splits and plans in this run's own folder.
    trainer.preprocessed_dataset_folder = str(setup.preprocessed_data)
    return trainer


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
    with setup.environ(), forward_stdout(log):
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
            log(f"nnU-Net: resuming from epoch {trainer.current_epoch} ({latest})")
        with _epoch_progress(trainer, enabled=rank == 0):
            trainer.run_training()
    if setup.final_validation:
        with pool_size(setup.workers):
            trainer.perform_actual_validation(setup.save_probabilities)
    return results


class _epoch_progress:
    """A rich progress bar over epochs, advanced after nnU-Net's ``on_epoch_end`` (rank 0 only)."""

    def __init__(self, trainer: Any, enabled: bool = True):
        self.trainer, self.enabled = trainer, enabled

    def __enter__(self):
        if not self.enabled:
            return self
        from rich.progress import Progress

        from vesuvius_lab.core.console import err

        trainer = self.trainer
        # No stdout redirection: nnU-Net's prints must keep flowing to the run's log.
        self.progress = Progress(console=err, transient=True, redirect_stdout=False, redirect_stderr=False)
        self.progress.start()
        task = self.progress.add_task("nnU-Net epochs", total=trainer.num_epochs, completed=trainer.current_epoch)
        original = trainer.on_epoch_end

        def on_epoch_end() -> None:
            original()
            self.progress.update(task, completed=trainer.current_epoch)

        trainer.on_epoch_end = on_epoch_end  # an instance attribute: only this trainer is affected
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()


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
    from vesuvius_lab.plugins.nnunet.environment import scoped_environ

    with setup.environ(), scoped_environ(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT")
                                         or _free_port()):
        mp.spawn(_ddp_worker, args=(nproc, setup), nprocs=nproc, join=True)
    return results_folder(setup)


def _ddp_worker(rank: int, world_size: int, setup: TrainingSetup) -> None:
    """One DDP rank (spawned): NCCL process group, one GPU, nnU-Net's own DDP code paths."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.cuda.set_device(torch.device("cuda", rank))
    try:
        _train_in_process(setup, "cuda", print, rank=rank)
    finally:
        dist.destroy_process_group()
