"""The nnU-Net backend as a :class:`~vesuvius_lab.core.contract.backend.SelfTrainingModel`.

``train`` converts the data (cached by content), fingerprints, plans and preprocesses it (cached
per planner and configuration), writes this run's splits and plans, and trains one fold with the
chosen trainer class; ``load`` and ``predict_probabilities`` run nnU-Net's predictor on
volumes. Every nnU-Net call sees its folders through ``os.environ`` for that call only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vesuvius_lab.core.contract.backend import TrainJob
from vesuvius_lab.core.config.spec import loader_workers
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.plugins.nnunet.cache_lock import cache_lock
from vesuvius_lab.plugins.nnunet.conversion import LABELS, convert_dataset
from vesuvius_lab.plugins.nnunet.environment import forward_stdout, nnunet_environ, to_output_file
from vesuvius_lab.plugins.nnunet.params import NnUNetParams
from vesuvius_lab.plugins.nnunet.planning import ensure_plans, ensure_preprocessed, require_configuration
from vesuvius_lab.plugins.nnunet.prediction import NnUNetPredictorRunner, PredictionSettings, prediction_settings
from vesuvius_lab.plugins.nnunet.run_folder import (OUTPUT_LOG, backend_folder, prepare_preprocessed_view, read_record,
                                                    write_record)
from vesuvius_lab.plugins.nnunet.shrink import customize_plans, flatten_configuration
from vesuvius_lab.plugins.nnunet.training import TrainingSetup, results_folder, train


def cache_folders(cache_dir: Path) -> tuple[Path, Path]:
    """The shared ``nnUNet_raw`` and ``nnUNet_preprocessed`` folders inside the project's cache."""
    root = Path(cache_dir) / "nnunet"
    return root / "nnUNet_raw", root / "nnUNet_preprocessed"


class NnUNetModel:
    """nnU-Net v2 trained and applied through its Python API, one fold per run."""

    def __init__(self, params: NnUNetParams, inference: Any = None):
        self.params = params
        self.inference = inference  # [inference] of the experiment; None: use the settings saved at training
        self.parameters_count: int | None = None
        self._runner: NnUNetPredictorRunner | None = None

    @property
    def components(self) -> dict[str, str]:
        """What nnU-Net uses in place of the experiment's ``[[loss]]`` and blender: its trainer's own loss
        (Dice + cross-entropy with deep supervision for nnU-Net's trainers) and its own window blending."""
        blend = "gaussian" if self.inference is None else self.inference.blend.plugin
        return {"loss": f"nnU-Net {self.params.trainer} (its own)", "blend": f"nnU-Net {blend}"}

    # ------------------------------------------------------------------ training

    def train(self, job: TrainJob) -> None:
        params, spec = self.params, job.spec
        if spec.data.ignore_label != LABELS["ignore"]:
            raise UserError(f"[data] ignore_label = {spec.data.ignore_label}: the nnunet model trains with label "
                            f"{LABELS['ignore']} as nnU-Net's ignore label. Set ignore_label = 2.")
        settings = prediction_settings(params, spec.inference)  # fail before hours of preprocessing
        note = short_run_note(params, spec.train.epochs * spec.train.iterations_per_epoch)
        if note:
            job.log(note)
        setup = self.prepare(job)
        results = results_folder(setup)
        record = {
            "dataset": setup.plans["dataset_name"], "plans_name": setup.plans["plans_name"],
            "configuration": setup.configuration, "trainer": params.trainer, "fold": setup.fold,
            "results": str(results.relative_to(backend_folder(job.run_dir))), "prediction": settings.to_json(),
        }
        if setup.init is not None:
            record["init"] = str(setup.init)
        write_record(job.run_dir, record)
        train(setup, job.device, spec.train.nproc, job.log)

    def prepare(self, job: TrainJob) -> TrainingSetup:
        """Convert, plan and preprocess (cached), write this run's splits and plans; the training setup."""
        params = self.params
        raw_root, preprocessed_root = cache_folders(job.cache_dir)
        folds = [list(map(str, fold)) for fold in job.folds]
        fold = nnunet_fold(job.fold, folds, job.val_ids)
        case_ids = sorted({*map(str, job.train_ids), *(case for ids in folds for case in ids)})
        output_log = backend_folder(job.run_dir) / OUTPUT_LOG
        with cache_lock(raw_root.parent, job.log):
            dataset = convert_dataset(job.data_root, case_ids, raw_root, job.log)
            with nnunet_environ(raw=raw_root, preprocessed=preprocessed_root, workers=params.preprocess_workers), \
                    forward_stdout(to_output_file(output_log, job.log)):
                plans = ensure_plans(dataset, preprocessed_root, params.planner, params.gpu_memory_gb,
                                     params.preprocess_workers, job.log)
                shared = preprocessed_root / dataset.name
                require_configuration(plans, params.configuration, shared / f"{plans['plans_name']}.json")
                ensure_preprocessed(dataset, preprocessed_root, plans["plans_name"], params.configuration,
                                    params.preprocess_workers, job.log)
        plans = customize_plans(plans, params.configuration, params.shrink, params.patch_size)
        dataset_json = _read_json(shared / "dataset.json")
        init = None
        if job.init is not None:  # a mismatch of layers is an error now, not after the first epoch
            from vesuvius_lab.plugins.nnunet.pretrained import check_init

            init = check_init(job.init, plans, params.configuration, dataset_json, params.trainer)
        view = prepare_preprocessed_view(job.run_dir, shared, plans, folds,
                                         with_ground_truth=params.final_validation)
        data_identifier = flatten_configuration(plans, params.configuration)["data_identifier"]
        train_spec = job.spec.train
        iterations = train_spec.iterations_per_epoch
        workers = loader_workers(train_spec.workers, job.device)
        return TrainingSetup(
            plans=plans, configuration=params.configuration, fold=fold, dataset_json=dataset_json,
            trainer=params.trainer,
            epochs=train_spec.epochs, iterations_per_epoch=iterations,
            val_iterations_per_epoch=params.val_iterations_per_epoch or max(1, round(iterations / 5)),
            preprocessed_view=view, preprocessed_data=shared / data_identifier,
            results=backend_folder(job.run_dir) / "nnUNet_results",
            seed=train_spec.seed or 0, workers=params.preprocess_workers,
            augmentation_workers=params.augmentation_workers if params.augmentation_workers is not None else workers,
            final_validation=params.final_validation, save_probabilities=params.save_probabilities,
            init=init, output_log=output_log, initial_lr=params.initial_lr, momentum=params.momentum,
            ema=train_spec.ema,
        )

    # ------------------------------------------------------------------ prediction

    def load(self, run_dir: Path, device: str) -> None:
        record = read_record(run_dir)
        settings = (prediction_settings(self.params, self.inference) if self.inference is not None
                    else PredictionSettings.from_json(record["prediction"]))
        self._runner = NnUNetPredictorRunner(backend_folder(run_dir) / record["results"], record["fold"],
                                             record["trainer"], self.params.checkpoint, settings, device)
        network = self._runner.predictor.network
        self.parameters_count = sum(p.numel() for p in network.parameters())

    def predict_probabilities(self, volume: np.ndarray) -> np.ndarray:
        if self._runner is None:
            raise RuntimeError("call load(run_dir, device) before predict_probabilities")
        return self._runner.predict_probabilities(volume)

    def window_model(self) -> tuple[Any, Any]:
        """The network as a window predictor and the ``[inference]`` it is blended with, for block-wise
        prediction of large volumes by the core's sliding windows: the plan's patch, the run's overlap and
        blender (nnU-Net's Gaussian is the core's with sigma_scale 1/8), its mirror axes as the core's flips
        (each flip alone, not every combination as nnU-Net mirrors)."""
        from vesuvius_lab.core.config.spec import InferenceSpec

        if self._runner is None:
            raise RuntimeError("call load(run_dir, device) before window_model")
        logits, patch = self._runner.window_network()
        settings, forward = self._runner.settings, self._runner.predictor.plans_manager.transpose_forward
        flips = sorted(forward[a] for a in self._runner.mirror_axes or ()) if settings.use_mirroring else []
        inference = InferenceSpec(
            window=patch, overlap=round(1.0 - settings.tile_step_size, 6),
            blend={"plugin": "gaussian" if settings.use_gaussian else "mean"},
            batch_size=self.inference.batch_size if self.inference is not None else 2,
            tta=[f"flip{axis}" for axis in flips], axes=[0])
        return logits, inference


#: nnU-Net's SGD momentum; it averages the gradients of about 1 / (1 - 0.99) = 100 steps.
NNUNET_MOMENTUM = 0.99
#: Fewer SGD steps than this, with nnU-Net's momentum, can end before its average has turned.
SHORT_RUN_STEPS = 1000


def short_run_note(params: NnUNetParams, steps: int) -> str | None:
    """A note for a training too short for nnU-Net's momentum 0.99 (its SGD, momentum not overridden)."""
    if params.momentum is not None or steps >= SHORT_RUN_STEPS:
        return None
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from vesuvius_lab.plugins.nnunet.trainers import trainer_class

    if trainer_class(params.trainer).configure_optimizers is not nnUNetTrainer.configure_optimizers:
        return None  # the trainer has its own optimiser
    return (f"nnU-Net: {steps} SGD steps with nnU-Net's momentum {NNUNET_MOMENTUM}, which averages the gradients of "
            "about 100 steps: a run this short can end while that average still pushes the wrong way (near-empty "
            "masks). Set params.momentum = 0.9 for runs of fewer than ~1000 iterations.")


def nnunet_fold(fold: int | str, folds: list[list[str]], val_ids: list[str]) -> int | str:
    """nnU-Net's fold for our fold: the same number (our folds are written as its splits), or ``"all"``
    (nnU-Net trains on every volume and reports its per-epoch pseudo-Dice on the training volumes)."""
    if fold == "all":
        if val_ids:
            raise ValueError(f"TrainJob.fold 'all' comes with no validation ids; got {val_ids}")
        return "all"
    if not isinstance(fold, int) or fold >= len(folds) or set(folds[fold]) != set(map(str, val_ids)):
        raise ValueError(f"TrainJob.folds[{fold}] must hold the validation ids {val_ids}; got folds {folds}")
    return fold


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
