"""The training loop: patches, losses, AMP, DDP, validation by the competition score, checkpoints, resume.

One entry point, :func:`train`. It creates (or, with ``resume``, reopens) a run directory, then
trains in this process, in ``nproc`` spawned processes (DDP, gloo on the CPU and nccl on CUDA),
or in the processes ``torchrun`` started. A model plugin that trains itself (nnU-Net) gets a
:class:`~vesuvius_lab.core.contract.backend.TrainJob` instead and is validated the same way afterwards.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vesuvius_lab.core import children, interrupts
from vesuvius_lab.core.runs import checkpoint
from vesuvius_lab.core.training.cpu_share import CoreFollower, describe_cores
from vesuvius_lab.core.contract.backend import SelfTrainingModel, TrainJob
from vesuvius_lab.core.config.experiment import LoadedExperiment
from vesuvius_lab.core.config.project import Project
from vesuvius_lab.core.config.spec import Experiment, loader_workers
from vesuvius_lab.core.console import err
from vesuvius_lab.core.data.dataset import open_volume
from vesuvius_lab.core.data.loader import Batches, batches_per_transfer
from vesuvius_lab.core.data.sampling import CachedVolumeSource, PatchStream, damaged_label, split_targets
from vesuvius_lab.core.data.split import TrainingSplit, check_volumes, make_split
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.engine import predict_volume
from vesuvius_lab.core.inference.postprocess import build_chain
from vesuvius_lab.core.inference.run_kinds import build_model, run_kind
from vesuvius_lab.core.inference.stitch_merge import merge_stitched
from vesuvius_lab.core.contract.models import count_parameters
from vesuvius_lab.core.runs.folder import Run, environment, new_run, open_run, read_spec
from vesuvius_lab.core.runs.lock import RunLock
from vesuvius_lab.core.training import distributed, tracking
from vesuvius_lab.core.runs.summary import write_summary
from vesuvius_lab.core.training.validation import ValidationResult, validate
from vesuvius_lab.core.training.warm_start import InitSource, load_initial_weights, resolve_init
from vesuvius_lab.core.training.weight_average import WeightAverage


class NonFiniteLoss(UserError):
    pass


@dataclass
class EpochSums:
    """The running sums of an epoch's loss terms; saved in a checkpoint taken inside an epoch, so the
    resumed epoch's record averages over all its iterations."""

    values: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    time_s: float = 0.0  # training time of the epoch before this process took it up

    def add(self, terms: dict) -> None:
        for name, value in terms.items():
            self.values[name] = self.values.get(name, 0.0) + float(value)
        self.iterations += 1

    def until_now(self, started: float) -> "EpochSums":
        return EpochSums(dict(self.values), self.iterations, self.time_s + time.time() - started)

    def to_dict(self) -> dict:
        return {"values": dict(self.values), "iterations": self.iterations, "time_s": self.time_s}

    @classmethod
    def from_dict(cls, record: dict | None) -> "EpochSums | None":
        return cls(dict(record["values"]), int(record["iterations"]), float(record["time_s"])) if record else None


@dataclass
class Setup:
    """Everything a training process needs; picklable so spawned ranks receive it."""

    spec: Experiment
    run_path: Path
    runs_dir: Path
    cache_dir: Path
    device: str
    split: TrainingSplit
    resume: bool
    init: InitSource | None = None  # [train] init, resolved; not used when resuming


def resolve_device(setting: str) -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("device = cuda, but torch sees no CUDA device here. Use --device cpu or auto.")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


# --------------------------------------------------------------------------- entry point


@interrupts.stop_signals()
def train(loaded: LoadedExperiment | None, project: Project, *, nproc: int | None = None,
          resume: Path | None = None) -> Run:
    """Train one experiment (one fold) and return its run; ``resume`` continues a run from ``last``.

    The run's lock is held until training ends, so no other process writes it meanwhile."""
    with ExitStack() as held:
        return _train(loaded, project, nproc, resume, held)


def _train(loaded: LoadedExperiment | None, project: Project, nproc: int | None, resume: Path | None,
           held: ExitStack) -> Run:
    if resume is not None:
        run = open_run(resume)
        if distributed.is_main():
            held.enter_context(RunLock(run))  # before anything is read or written
        spec = read_spec(run)
        if nproc:
            spec = spec.model_copy(update={"train": spec.train.model_copy(update={"nproc": nproc})})
    else:
        spec = project.resolve(loaded.spec)
        if nproc:
            spec = spec.model_copy(update={"train": spec.train.model_copy(update={"nproc": nproc})})
        run = None
    device = resolve_device(project.settings.device)
    split = make_split(spec)
    init = resolve_init(spec.train.init, project.runs_dir) if spec.train.init and resume is None else None
    if distributed.is_main() and not distributed.launched_by_torchrun():
        check_volumes(split, spec.data.window, project.cache_dir)
        _check_init(spec, init)
        # Build the chain once now: a step that cannot load (a missing stitcher run) fails before training.
        build_chain(spec.postprocess, threshold=spec.inference.threshold, device=device, runs_dir=project.runs_dir)
    world_size = int(os.environ["WORLD_SIZE"]) if distributed.launched_by_torchrun() else spec.train.nproc
    if distributed.launched_by_torchrun():
        distributed.init(int(os.environ["RANK"]), world_size, _rank_device(device, int(os.environ.get("LOCAL_RANK", 0))))
    if run is None and distributed.is_main():
        run = _start_run(spec, project, device, world_size)
        held.enter_context(RunLock(run))
    run = Run(Path(distributed.broadcast_object(str(run.path) if run else None)))
    setup = Setup(spec, run.path, project.runs_dir, project.cache_dir, device, split, resume is not None, init)
    if distributed.is_main():
        _log(run, f"run {run.path}")
        if split.note:
            _log(run, split.note)
    try:
        model = build_model(spec)
        if isinstance(model, SelfTrainingModel):
            _train_backend(model, setup, run)
        elif distributed.launched_by_torchrun():
            _rank_main(int(os.environ["RANK"]), world_size, None, setup)
        elif world_size > 1:
            if device == "cuda" and torch.cuda.device_count() < world_size:
                raise UserError(f"nproc = {world_size}, but only {torch.cuda.device_count()} CUDA devices are visible.")
            _log(run, f"starting {world_size} DDP processes ({'nccl' if device == 'cuda' else 'gloo'})")
            try:
                distributed.spawn(_rank_main, world_size, setup)
            except distributed.RankFailed as exc:
                error = (run.read("status.json") or {}).get("error")
                raise UserError(error) if error and exc.exit_code == 2 else exc
        else:
            _rank_main(0, 1, None, setup)
    except KeyboardInterrupt as exc:
        if distributed.is_main():
            run.set_status("interrupted", signal=str(exc) or "SIGINT")
            err.print(f"[yellow]Interrupted.[/] Resume with: vlab train --resume {run.path}")
        raise
    except BaseException as exc:
        if distributed.is_main() and (run.read("status.json") or {}).get("state") == "running":
            run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return run


def _check_init(spec: Experiment, init: InitSource | None) -> None:
    """A torch model's initial weights must fit it: refused before a run folder exists."""
    if init is None:
        return
    model = build_model(spec)
    if not isinstance(model, SelfTrainingModel):  # a backend maps init onto its own mechanism
        load_initial_weights(model, init)


def _start_run(spec: Experiment, project: Project, device: str, world_size: int) -> Run:
    run = new_run(project.runs_dir, spec.name, spec.data.fold)
    run.write("spec.json", spec.model_dump(mode="json"))
    run.write("env.json", environment(seed=spec.train.seed, world_size=world_size, device=device, cwd=project.root))
    run.set_status("running", epoch=0)
    return run


def _rank_device(device: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if device == "cuda" else device


def _log(run: Run, message: str) -> None:
    if distributed.is_main():
        err.print(message, highlight=False, markup=False)
        run.log(message)


# --------------------------------------------------------------------------- one rank


def _rank_main(rank: int, world_size: int, port: int | None, setup: Setup) -> None:
    """Train on one rank (the whole job when world_size is 1)."""
    device = _rank_device(setup.device, rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    distributed.init(rank, world_size, device, port)
    torch.set_num_threads(max(1, len(children.usable_cpus()) // world_size))  # --jobs pins a CPU job to its cores
    try:
        with interrupts.stop_signals():
            Trainer(setup, rank, world_size, device).fit()
        distributed.shutdown(together=True)
    except UserError as exc:
        if world_size == 1:
            raise
        # A spawned rank cannot hand its exception to the parent: record it, exit with status 2.
        if rank == 0:
            Run(setup.run_path).set_status("failed", error=str(exc))
        raise SystemExit(2)
    except KeyboardInterrupt as exc:
        if world_size == 1 or distributed.launched_by_torchrun():
            raise
        raise SystemExit(getattr(exc, "exit_code", 130))  # the parent turns this status back into Interrupted
    finally:
        distributed.shutdown()


class Trainer:
    """One rank's training: model, objective, optimizer, schedule, AMP; epochs, validation, checkpoints."""

    def __init__(self, setup: Setup, rank: int, world_size: int, device: str):
        from vesuvius_lab.core.training.objective import build_objective

        self.setup, self.spec, self.rank, self.world_size, self.device = setup, setup.spec, rank, world_size, device
        self.run = Run(setup.run_path)
        self.cores = CoreFollower(world_size)
        torch.manual_seed(self.spec.train.seed + rank)
        self.model = build_model(self.spec).to(device)
        if setup.init is not None and not setup.resume:
            _log(self.run, load_initial_weights(self.model, setup.init))
        self.average = WeightAverage(self.model, self.spec.train.ema) if self.spec.train.ema else None
        self.objective = build_objective(self.spec.loss)
        self.optimizer = _optimizer(self.spec, self.model.parameters())
        self.steps_per_epoch = max(1, self.spec.train.iterations_per_epoch // self.spec.train.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(self.spec, self.steps_per_epoch))
        self.amp_dtype = _amp_dtype(self.spec.train.amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16 and device.startswith("cuda"))
        self.start_epoch, self.best_score, self.best_epoch = 0, -math.inf, None
        self.start_iteration, self.partial = 0, None  # where a resume continues inside an epoch
        if setup.resume:
            self._restore()
        self.ddp_model = self.model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_model = DistributedDataParallel(self.model, device_ids=[device] if device.startswith("cuda") else None)

    # ------------------------------------------------------------------ state

    def _state(self, epoch: int, partial: EpochSums | None = None) -> dict:
        """The checkpoint after ``epoch`` is complete, or, with ``partial``, in the middle of epoch + 1:
        a resume continues at ``resume_at`` = (epoch index, iteration) with the same schedule."""
        resume_at = (epoch + 1, 0) if partial is None else (epoch + 1, partial.iterations)
        # "model" is what predicts: the weight average when [train] ema is set, the raw weights beside it.
        averaged = {"raw_model": self.model.state_dict(), "ema_updates": self.average.updates} if self.average else {}
        return {
            "model": self.evaluated_model.state_dict(), **averaged, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "resume_at": list(resume_at), "partial_epoch": partial.to_dict() if partial else None,
            "best_score": self.best_score, "best_epoch": self.best_epoch,
            "rng_torch": torch.get_rng_state(), "model_plugin": self.spec.model.plugin,
            "model_params": self.spec.model.params, "experiment": self.spec.name,
        }

    def _restore(self) -> None:
        path = self.run.checkpoints / "last.pt"
        state = checkpoint.load(path, map_location=self.device)
        checkpoint.load_model_state(self.model, state, path, self.spec.model.plugin, self.spec.model.params)
        if self.average is not None and "raw_model" in state:
            self.average.load_state_dict({"weights": state["model"], "updates": state["ema_updates"]})
            self.model.load_state_dict(state["raw_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.start_epoch, self.start_iteration = state.get("resume_at") or (state["epoch"] + 1, 0)
        self.partial = EpochSums.from_dict(state.get("partial_epoch"))
        where = f"after epoch {self.start_epoch}" if not self.start_iteration else \
            f"in epoch {self.start_epoch + 1} at iteration {self.start_iteration + 1}"
        _log(self.run, f"resuming {where} (best score so far {self.best_score:.4f})")

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """What validation and prediction use: the weight average when there is one."""
        return self.average.model if self.average is not None else self.model

    def _save(self, name: str, epoch: int, partial: EpochSums | None = None) -> None:
        if self.rank == 0:
            checkpoint.save(self.run.checkpoints / f"{name}.pt", self._state(epoch, partial))

    # ------------------------------------------------------------------ loop

    def fit(self) -> None:
        spec = self.spec.train
        if self.start_epoch >= spec.epochs:
            _log(self.run, f"all {spec.epochs} epochs are done already; nothing to train.")
        batches = self.batches(self.start_epoch)
        started = time.time()
        # A stop signal is handled at the next step boundary (see core/interrupts.py); a forced
        # stop (a second Ctrl-C) keeps the last checkpoint saved at such a boundary. Trackers (rank 0)
        # get each epoch's record, and the summary and pictures when the block ends.
        with tracking.tracked(self.spec, self.run.path, self.setup.runs_dir, enabled=self.rank == 0) as trackers:
            with interrupts.stop_signals(at="at the end of this training step, saving it first"):
                for epoch in range(self.start_epoch, spec.epochs):
                    self.run.set_status("running", epoch=epoch + 1) if self.rank == 0 else None
                    record = self._train_epoch(epoch, batches)
                    if (epoch + 1) % spec.validate_every == 0 or epoch + 1 == spec.epochs:
                        record["val"] = self._validate_and_keep_best(epoch)
                    self._save("last", epoch)
                    if self.rank == 0:
                        self.run.append_metrics(record)
                        trackers.log_epoch(record)
                    self._print_epoch(record) if self.rank == 0 else None
                    self._stop_if_asked()
            if self.rank == 0:
                self._finish(time.time() - started)
        distributed.barrier()  # every rank leaves together: none tears down its group while another still talks

    def batches(self, start_epoch: int):
        """An endless iterator of training batches. Its workers live as long as it does, so they start
        once per run rather than once per epoch; its random stream is seeded by the start epoch, so a
        resumed run draws a reproducible stream too."""
        skeleton = self.objective.wants("skeleton")  # targets cropped from a per-volume cache, when a loss asks
        # Each volume is opened (decoded, checked) when first sampled: start-up costs the index only.
        sources = [CachedVolumeSource(self.setup.split.image(i), self.setup.split.label(i), self.setup.cache_dir,
                                      skeleton=skeleton) for i in self.setup.split.train_ids]
        train = self.spec.train
        stitching = self.spec.data.task == "hole_stitching"
        self.stream = PatchStream(sources, self.spec.data.window, foreground_share=self.spec.data.foreground_oversample,
                                  switches=self.spec.data.augment, seed=train.seed, rank=self.rank,
                                  corruption=self.spec.data.corruption if stitching else None, skeleton=skeleton)
        self.stream.set_epoch(start_epoch)
        per_transfer = batches_per_transfer(train.batch_size, self.spec.data.window, 2 if skeleton else 1)
        return Batches(self.stream, train.batch_size, workers=loader_workers(train.workers, self.device),
                       per_transfer=per_transfer, pin_memory=self.device.startswith("cuda"))

    def _train_epoch(self, epoch: int, batches) -> dict:
        spec = self.spec.train
        self.ddp_model.train()
        first = self.start_iteration if epoch == self.start_epoch else 0  # > 0: resumed inside this epoch
        sums = (self.partial if first else None) or EpochSums()
        started = time.time()
        with _progress(self.rank == 0, f"epoch {epoch + 1}/{spec.epochs}", spec.iterations_per_epoch) as advance:
            advance(advance=first)
            for index in range(first, spec.iterations_per_epoch):
                image, targets = next(batches)
                label, skeleton = split_targets(targets)  # a skeleton target when a loss asks for one
                last_of_step = (index + 1) % spec.grad_accum == 0 or index + 1 == spec.iterations_per_epoch
                loss, terms = self.train_step(image, label, skeleton, step=last_of_step, where=(epoch, index))
                sums.add({"loss": loss, **terms})
                advance(loss=loss.item())
                if last_of_step and index + 1 < spec.iterations_per_epoch:
                    self._stop_if_asked(epoch - 1, sums.until_now(started))
                if self.cores.follow():  # vlab run --jobs: cores that ended jobs freed, shared out
                    _log(self.run, f"now on cores {describe_cores(self.cores.applied)}: vlab run --jobs shared out "
                                   "the cores that no other job uses")
        elapsed = time.time() - started
        means = distributed.mean_across_ranks({k: v / max(sums.iterations, 1) for k, v in sums.values.items()})
        return {"epoch": epoch + 1, "loss": means.pop("loss"), "loss_terms": means,
                "lr": self.optimizer.param_groups[0]["lr"],
                "samples_per_s": (spec.iterations_per_epoch - first) * spec.batch_size * self.world_size
                / max(elapsed, 1e-9),
                "time_s": sums.time_s + elapsed}

    def _stop_if_asked(self, epoch: int | None = None, partial: EpochSums | None = None) -> None:
        """At a step boundary: if a stop signal came (to any rank), save ``last`` here and stop."""
        signum = distributed.max_across_ranks(interrupts.pending() or 0)
        if not signum:
            return
        if partial is not None:  # inside an epoch: save this exact position; at an epoch's end it is saved
            self._save("last", epoch, partial)
        distributed.barrier()
        raise interrupts.Interrupted(signum)

    def train_step(self, image: torch.Tensor, label: torch.Tensor, skeleton: torch.Tensor | None = None, *,
                   step: bool = True, where: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, dict]:
        """Forward and backward one batch (and step the optimizer when ``step``); detached loss and terms.
        ``where`` is (epoch index, iteration): loss terms with a start_epoch steer from their epoch on."""
        image = image.to(self.device, non_blocking=True)
        label = label.to(self.device, non_blocking=True)
        if skeleton is not None:
            skeleton = skeleton.to(self.device, non_blocking=True)
        ignore = self.spec.data.ignore_label
        valid = label != ignore if ignore is not None else torch.ones_like(label, dtype=torch.bool)
        target = (label == 1).float()
        sync = nullcontext() if step or self.world_size == 1 else self.ddp_model.no_sync()
        with sync:
            with _autocast(self.device, self.amp_dtype):
                logits = self.ddp_model(image)  # a list of heads for a network with deep supervision
                loss, terms = self.objective(logits, target, valid, inputs=image, skeleton=skeleton, epoch=where[0],
                                             head_weights=getattr(self.model, "deep_supervision_weights", None))
            if not torch.isfinite(loss):
                epoch, index = where
                raise NonFiniteLoss(
                    f"The loss became {loss.item()} at epoch {epoch + 1}, iteration {index + 1} "
                    f"({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}). The last good "
                    f"checkpoint is kept in {self.run.checkpoints}. Lower train.lr, enable grad_clip, "
                    "or turn AMP off, then start again (or resume).")
            self.scaler.scale(loss / self.spec.train.grad_accum).backward()
        if step:
            self._optimizer_step()
        return loss.detach(), terms

    def _optimizer_step(self) -> None:
        clip = self.spec.train.grad_clip
        if clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.average is not None:
            self.average.update(self.model)

    # ------------------------------------------------------------------ validation

    def _validate_and_keep_best(self, epoch: int) -> dict | None:
        result = None
        if self.rank == 0 and self.setup.split.val_ids:
            result = validate_model(self.evaluated_model, self.spec, self.setup, self.device)
            if result.score > self.best_score:
                self.best_score, self.best_epoch = result.score, epoch + 1
                self._save("best", epoch)
                self.run.write("scores.json", {"epoch": epoch + 1, **result.to_dict()})
        distributed.barrier()
        return {**result.mean, "steps": result.steps} if result else None

    def _print_epoch(self, record: dict) -> None:
        val = record.get("val")
        text = f"epoch {record['epoch']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, " \
               f"{record['samples_per_s']:.1f} samples/s"
        if val:
            text += (f", val score {val['score']:.4f} (topo {val['topo_score']:.3f}, "
                     f"surface dice {val['surface_dice']:.3f}, voi {val['voi_score']:.3f})")
        _log(self.run, text)

    def _finish(self, wall_time: float) -> None:
        if self.best_epoch is None and not self.setup.split.val_ids:
            checkpoint.save(self.run.checkpoints / "best.pt", self._state(self.spec.train.epochs - 1))
        write_summary(self.run, self.spec, wall_time=wall_time, parameters=count_parameters(self.model),
                      epochs_done=self.spec.train.epochs, best_epoch=self.best_epoch, kind="model")


def validate_model(model: torch.nn.Module, spec: Experiment, setup: Setup, device: str) -> ValidationResult:
    """Predict the validation fold's whole volumes, post-process and score them."""
    chain = build_chain(spec.postprocess, threshold=spec.inference.threshold, device=device, runs_dir=setup.runs_dir)

    def predict(image: np.ndarray) -> np.ndarray:
        return predict_volume(image, model, spec.inference, window=spec.inference_window, device=device)

    stitching = spec.data.task == "hole_stitching"
    return validate(predict, _validation_cases(setup), chain, ignore_label=spec.data.ignore_label,
                    score_input=stitching, merge_input=merge_stitched if stitching else None)


def _validation_cases(setup: Setup):
    """(id, input, label) per validation volume; for hole stitching the input is the damaged label,
    damaged the same way at every validation (seeded by the volume id)."""
    stitching = setup.spec.data.task == "hole_stitching"
    for volume_id in setup.split.val_ids:
        label = open_volume(setup.split.label(volume_id), setup.cache_dir)
        if stitching:
            rng = np.random.default_rng([setup.spec.train.seed, *volume_id.encode()])
            yield volume_id, damaged_label(np.asarray(label), rng, setup.spec.data.corruption), label
        else:
            yield volume_id, open_volume(setup.split.image(volume_id), setup.cache_dir), label


# --------------------------------------------------------------------------- self-training backends


def _train_backend(model: SelfTrainingModel, setup: Setup, run: Run) -> None:
    with tracking.tracked(setup.spec, run.path, setup.runs_dir, enabled=distributed.is_main()) as trackers:
        _train_backend_tracked(model, setup, run, trackers)


def _train_backend_tracked(model: SelfTrainingModel, setup: Setup, run: Run, trackers: tracking.Trackers) -> None:
    """The backend trains; the core validates and records it. Trackers get the final record and summary."""
    spec = setup.spec
    started = time.time()
    job = TrainJob(spec=spec, data_root=Path(spec.data.root), train_ids=setup.split.train_ids,
                   val_ids=setup.split.val_ids, fold=spec.data.fold, folds=setup.split.folds,
                   run_dir=run.path, cache_dir=setup.cache_dir, device=setup.device,
                   init=setup.init.path if setup.init is not None else None,
                   log=lambda message: _log(run, message))
    model.train(job)
    model.load(run.path, setup.device)
    record = {"epoch": spec.train.epochs, "time_s": time.time() - started}
    if setup.split.val_ids:
        chain = build_chain(spec.postprocess, threshold=spec.inference.threshold, device=setup.device,
                            runs_dir=setup.runs_dir)
        result = validate(model.predict_probabilities, _validation_cases(setup), chain,
                          ignore_label=spec.data.ignore_label)
        run.write("scores.json", {"epoch": spec.train.epochs, **result.to_dict()})
        record["val"] = {**result.mean, "steps": result.steps}
        _log(run, f"validation score {result.score:.4f}")
    run.append_metrics(record)
    trackers.log_epoch(record)
    write_summary(run, spec, wall_time=time.time() - started, parameters=getattr(model, "parameters_count", None),
                  epochs_done=spec.train.epochs, best_epoch=spec.train.epochs, kind=run_kind(spec, model),
                  components=getattr(model, "components", None))


# --------------------------------------------------------------------------- pieces


def _optimizer(spec: Experiment, parameters) -> torch.optim.Optimizer:
    train = spec.train
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=train.lr, momentum=train.momentum, nesterov=True,
                               weight_decay=train.weight_decay)
    return torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)


def _lr_factor(spec: Experiment, steps_per_epoch: int):
    """Linear warm-up, then poly (exponent 0.9, as nnU-Net), cosine or constant; per optimizer step."""
    train = spec.train
    warmup = train.warmup_epochs * steps_per_epoch
    total = max(train.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if train.scheduler == "poly":
            return (1 - progress) ** 0.9
        if train.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _amp_dtype(setting: str, device: str) -> torch.dtype | None:
    """auto: bf16 where the GPU supports it, else fp16; off on the CPU (no speed-up for these nets)."""
    if setting == "off" or (setting == "auto" and not device.startswith("cuda")):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


def _autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


class _progress:
    """A rich progress bar with the running loss on rank 0; nothing on other ranks."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self):
        if not self.enabled:
            return lambda **fields: None  # advance(loss=...) per iteration; advance(advance=n) skips n
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                                 console=err, transient=True)
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total, loss=float("nan"))
        return lambda **fields: self.progress.update(task, **{"advance": 1, **fields})

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
