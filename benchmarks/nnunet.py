"""The nnU-Net backend against calling nnU-Net directly: same tiny dataset, same settings.

Both sides run in this process from the competition layout to probabilities of the validation
volumes, with the same planner (ResEncM), configuration (3d_fullres), shrunk network, fold,
epochs, iterations, worker counts and predictor settings:

- ours: ``NnUNetModel.train(job)`` (conversion with checks and content hashing, fingerprint,
  plan, preprocess, this run's splits and plans, training), then ``load`` and
  ``predict_probabilities`` per validation volume;
- direct: files copied into nnU-Net's raw layout by hand, the ``plan_and_preprocess_api`` calls,
  the plans dict edited by hand, ``splits_final.json`` written, ``nnUNetTrainer`` instantiated and
  ``run_training()``, then ``nnUNetPredictor.predict_single_npy_array`` per volume.

Each side starts from empty folders in every repeat; the best wall time over the repeats is
printed per phase. Target: ours at most 5% slower in total. nnU-Net's spawned process pools
(fingerprint, preprocessing) dominate on small data and vary a lot on a busy machine: compare
repeats before trusting a few percent. Also printed: our preparation on a cache hit (the rerun
of an experiment, another fold), which the direct path has no counterpart for.

    OMP_NUM_THREADS=1 python benchmarks/nnunet.py
    OMP_NUM_THREADS=1 python benchmarks/nnunet.py --n 4 --side 32 --repeats 1   # a quick run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import _summary
import numpy as np

PATCH, STAGES, FEATURES, BATCH = [32, 32, 32], 3, [8, 16, 32], 2
PARAMS = {
    "planner": "nnUNetPlannerResEncM", "configuration": "3d_fullres", "trainer": "nnUNetTrainer",
    "augmentation_workers": 0, "preprocess_workers": 1, "val_iterations_per_epoch": 1,
    "shrink": {"patch_size": PATCH, "n_stages": STAGES, "features_per_stage": FEATURES, "batch_size": BATCH},
}


def write_dataset(root: Path, n: int, side: int) -> list[list[str]]:
    """``n`` volumes with tilted bright sheets (labels 0/1/2) over 3 scrolls; returns the folds."""
    from vesuvius_lab.core.data.tiff import write_volume

    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.arange(side),) * 3, indexing="ij")
    folds: list[list[str]] = [[], [], []]
    for index in range(n):
        label = np.zeros((side,) * 3, np.uint8)
        for offset in rng.uniform(0, side, size=2):
            label[np.abs(0.3 * y + 0.2 * x + offset - z - side / 3) < 1.5] = 1
        image = np.clip(60 + 120 * label + rng.normal(0, 20, label.shape), 0, 255).astype(np.uint8)
        label[:2], label[:, :, -2:] = 2, 2
        write_volume(root / "train_images" / f"{index}.tif", image)
        write_volume(root / "train_labels" / f"{index}.tif", label)
        folds[index % 3].append(str(index))
    (root / "train.csv").write_text("id,scroll_id\n" + "".join(f"{i},{i % 3}\n" for i in range(n)))
    return folds


class Clock:
    def __init__(self):
        self.phases: dict[str, float] = {}

    def time(self, phase: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.phases[phase] = clock.phases.get(phase, 0.0) + time.perf_counter() - self.start

        return _Phase()


def run_ours(data: Path, work: Path, folds: list[list[str]], epochs: int, iterations: int,
             volumes: list[np.ndarray]) -> tuple[dict[str, float], list[np.ndarray]]:
    from vesuvius_lab.core import registry
    from vesuvius_lab.core.contract.backend import TrainJob
    from vesuvius_lab.core.config.spec import Experiment

    spec = Experiment.model_validate({
        "name": "bench", "data": {"root": str(data), "fold": 0}, "model": {"plugin": "nnunet", "params": PARAMS},
        "train": {"epochs": epochs, "iterations_per_epoch": iterations, "seed": 0, "workers": 0},
    })
    train_ids = [case for fold in folds[1:] for case in fold]

    def job(run: str) -> TrainJob:
        return TrainJob(spec=spec, data_root=data, train_ids=train_ids, val_ids=folds[0], fold=0, folds=folds,
                        run_dir=work / run, cache_dir=work / "cache", device="cpu", log=lambda message: None)

    clock = Clock()
    model = registry.build("models", "nnunet", spec.model.params, inference=spec.inference)
    with clock.time("prepare + train"):
        model.train(job("run"))
    with clock.time("load + predict"):
        model.load(work / "run", "cpu")
        outputs = [model.predict_probabilities(volume) for volume in volumes]
    with clock.time("(ours only) prepare on a cache hit"):
        model.prepare(job("run-again"))
    return clock.phases, outputs


def run_direct(data: Path, work: Path, folds: list[list[str]], epochs: int, iterations: int,
               volumes: list[np.ndarray]) -> tuple[dict[str, float], list[np.ndarray]]:
    import torch
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
        nnUNetPlannerResEncM
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    dataset_id, name = 500, "Dataset500_Direct"
    raw, preprocessed, results = work / "raw", work / "preprocessed", work / "results"
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results),
                      nnUNet_n_proc_DA="1")
    ids = sorted(case for fold in folds for case in fold)
    clock = Clock()
    with clock.time("prepare + train"):
        for sub in ("imagesTr", "labelsTr"):
            (raw / name / sub).mkdir(parents=True)
        for case in ids:
            shutil.copyfile(data / "train_images" / f"{case}.tif", raw / name / "imagesTr" / f"{case}_0000.tif")
            shutil.copyfile(data / "train_labels" / f"{case}.tif", raw / name / "labelsTr" / f"{case}.tif")
            for sub in ("imagesTr", "labelsTr"):
                (raw / name / sub / f"{case}.json").write_text('{"spacing": [1, 1, 1]}')
        dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "surface": 1, "ignore": 2},
                        "numTraining": len(ids), "file_ending": ".tif", "overwrite_image_reader_writer": "Tiff3DIO"}
        (raw / name / "dataset.json").write_text(json.dumps(dataset_json))
        extract_fingerprint_dataset(dataset_id, num_processes=1, check_dataset_integrity=False, clean=True,
                                    verbose=False)
        plans, plans_name = plan_experiment_dataset(dataset_id, nnUNetPlannerResEncM)
        preprocess_dataset(dataset_id, plans_name, ["3d_fullres"], [1], verbose=False)
        plans = copy.deepcopy(plans)
        config = plans["configurations"]["3d_fullres"]
        arch = config["architecture"]["arch_kwargs"]
        arch["n_stages"], arch["features_per_stage"] = STAGES, FEATURES
        for key in ("kernel_sizes", "strides", "n_blocks_per_stage"):
            arch[key] = arch[key][:STAGES]
        arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][:STAGES - 1]
        config["patch_size"], config["batch_size"] = PATCH, BATCH
        every = [case for fold in folds for case in fold]
        splits = [{"train": sorted(c for c in every if c not in fold), "val": sorted(fold)} for fold in folds]
        (preprocessed / name / "splits_final.json").write_text(json.dumps(splits))
        os.environ["nnUNet_n_proc_DA"] = "0"
        plans["continue_training"] = False
        random.seed(0), np.random.seed(0), torch.manual_seed(0)  # as the backend seeds its trainer
        trainer = nnUNetTrainer(plans=plans, configuration="3d_fullres", fold=0, dataset_json=dataset_json,
                                device=torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iterations
        trainer.num_val_iterations_per_epoch = max(1, round(iterations / 5))
        trainer.run_training()
    with clock.time("load + predict"):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(trainer.output_folder_base, (0,), "checkpoint_final.pth")
        outputs = [predictor.predict_single_npy_array(volume[None].astype(np.float32), {"spacing": [1, 1, 1]},
                                                      None, None, True)[1][1] for volume in volumes]
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        os.environ.pop(key, None)
    return clock.phases, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6, help="training volumes")
    parser.add_argument("--side", type=int, default=48, help="volume side")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5, help="iterations per epoch")
    parser.add_argument("--repeats", type=int, default=2)
    _summary.add_argument(parser)
    args = parser.parse_args()

    import contextlib
    import io

    # Imports are not what is measured: load everything either side needs before the first repeat.
    import nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners  # noqa
    import nnunetv2.experiment_planning.plan_and_preprocess_api  # noqa: F401
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401
    from rich.console import Console
    from rich.table import Table

    import vesuvius_lab.plugins.nnunet.model  # noqa: F401
    from vesuvius_lab.core.data.tiff import read_volume

    root = Path(tempfile.mkdtemp(prefix="vlab-bench-nnunet-"))
    try:
        folds = write_dataset(root / "data", args.n, args.side)
        volumes = [read_volume(root / "data" / "train_images" / f"{case}.tif") for case in folds[0]]
        best: dict[str, dict[str, float]] = {"ours": {}, "direct": {}}
        results = {}
        for repeat in range(args.repeats):
            order = [("ours", run_ours), ("direct", run_direct)]
            for side, run in order if repeat % 2 == 0 else order[::-1]:
                work = root / f"{side}-{repeat}"
                with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's chatter
                    phases, results[side] = run(root / "data", work, folds, args.epochs, args.iterations, volumes)
                for phase, seconds in phases.items():
                    best[side][phase] = min(seconds, best[side].get(phase, float("inf")))
                print(f"repeat {repeat + 1} {side}: " + ", ".join(f"{p} {s:.1f} s" for p, s in phases.items()))
                shutil.rmtree(work, ignore_errors=True)
        same = max(float(np.abs(a - b).max()) for a, b in zip(results["ours"], results["direct"]))

        table = Table(title=f"nnU-Net backend vs nnU-Net direct: {args.n} volumes of {args.side}^3, "
                            f"{args.epochs} epochs x {args.iterations} iterations, best of {args.repeats}")
        for column in ("phase", "ours s", "direct s", "overhead"):
            table.add_column(column, justify="right" if column != "phase" else "left")
        total = {side: sum(s for p, s in best[side].items() if not p.startswith("(")) for side in best}
        for phase in best["ours"]:
            ours, direct = best["ours"][phase], best["direct"].get(phase)
            table.add_row(phase, f"{ours:.2f}", f"{direct:.2f}" if direct else "-",
                          f"{100 * (ours / direct - 1):+.1f}%" if direct else "-")
        table.add_row("total", f"{total['ours']:.2f}", f"{total['direct']:.2f}",
                      f"{100 * (total['ours'] / total['direct'] - 1):+.1f}%")
        Console().print(table)
        print(f"largest difference between the two sides' probabilities: {same:.2e} "
              "(both seed their trainer alike; 0 means the same model and the same prediction)")
        setting = f"{args.n} volumes of {args.side}^3, {args.epochs} epochs x {args.iterations} iterations"
        rows = [_summary.row("nnunet", f"total wall time, {setting}", total["ours"], "s", peer=total["direct"],
                             peer_name="nnU-Net called directly", target="overhead <= 5%",
                             note=f"overhead {100 * (total['ours'] / total['direct'] - 1):+.1f}%, best of "
                                  f"{args.repeats}; max |ours - direct| probability {same:.1e}")]
        rows += [_summary.row("nnunet", phase, seconds, "s", peer=best["direct"].get(phase),
                              peer_name="nnU-Net called directly" if phase in best["direct"] else None)
                 for phase, seconds in best["ours"].items()]
        _summary.write(args.summary, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # nnU-Net's process pools re-import this module
    main()
