"""The ``vlab`` command: argument parsing and printing only; the work happens in ``core``.

Heavy libraries (torch, MONAI, nnU-Net) are imported inside the commands that need them, so
``vlab --help``, ``vlab validate`` and ``vlab plugins`` stay fast.
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from vesuvius_lab import __version__
from vesuvius_lab.core.console import err, out
from vesuvius_lab.core.errors import UserError, is_user_os_error, os_error_message

SET_HELP = "Override any experiment key, e.g. --set train.epochs=3 (the value is read as TOML)."


class ProjectContext:
    """What the group-level options choose: the project file and command-line overrides."""

    def __init__(self, project_file: str | None, data: str | None, runs: str | None, device: str | None):
        self.project_file, self.data, self.runs, self.device = project_file, data, runs, device

    def project(self):
        from vesuvius_lab.core.config.project import load_project

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
    """Check experiment files: every problem of every file (and of every [sweep] combination), with file, line and key path."""
    from vesuvius_lab.core.config.checked import check_files

    loaded, problems = check_files(list(files), list(overrides))
    if not quiet:
        for item in loaded:
            out.print(f"[green]ok[/]  {item.file}  ({item.spec.name}: model {_escape(item.spec.model_label)})")
    if problems:
        for problem in problems:
            err.print(f"[bold red]error[/] {_escape(str(problem))}")
        err.print(f"{len(problems)} problem(s) in {len({p.file for p in problems})} file(s).")
        sys.exit(2)


@cli.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
def schema(output):
    """Print the JSON Schema of experiment files (for Taplo / Even Better TOML)."""
    from vesuvius_lab.core.config.spec import Experiment

    text = json.dumps(Experiment.model_json_schema(), indent=2)
    if output:
        from vesuvius_lab.core.files import write_text_atomic

        write_text_atomic(Path(output), text + "\n")
        err.print(f"wrote {output}")
    else:
        click.echo(text)


# --------------------------------------------------------------------------- training and prediction


@cli.command()
@click.argument("experiment", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--fold", type=int, help="Validation fold (same as --set data.fold=K).")
@click.option("--nproc", type=int, help="DDP processes on this machine (beats train.nproc).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue this run from its last checkpoint.")
@click.pass_obj
def train(obj: ProjectContext, experiment, overrides, fold, nproc, resume):
    """Train an experiment (one fold), validate it with the competition score, record the run."""
    from vesuvius_lab.core.config.checked import read_experiment

    if bool(experiment) == bool(resume):
        raise UserError("Give either an experiment file to start a run or --resume RUN_DIR to continue one.")
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc {nproc}: give at least 1 process.")
    overrides = list(overrides) + ([f"data.fold={fold}"] if fold is not None else [])
    loaded = read_experiment(experiment, overrides) if experiment else None
    if loaded is not None and loaded.spec.ensemble is not None:
        raise UserError(f"{experiment}: an [ensemble] combines runs that are trained already; build it with "
                        f"`vlab ensemble {experiment}`.")
    from vesuvius_lab.core.training.trainer import train as run_training  # torch: after the file is checked

    run = run_training(loaded, obj.project(), nproc=nproc, resume=Path(resume) if resume else None)
    _print_result(run, f"fold {run.read('summary.json', {}).get('fold')}")


def _print_result(run, label: str) -> None:
    """The run's score line (when it has a score) and its folder."""
    summary = run.read("summary.json", {})
    if "score" in summary:
        out.print(f"[bold]{_escape(run.experiment)}[/] {_escape(label)}: score [bold]{summary['score']:.4f}[/] "
                  f"(TopoScore {summary['topo_score']:.4f}, SurfaceDice {summary['surface_dice']:.4f}, "
                  f"VOI {summary['voi_score']:.4f})")
    out.print(f"run: {run.path}")


@cli.command()
@click.argument("run_dir", required=False)
@click.option("--input", "-i", "source", type=click.Path(),
              help="A .tif volume or a folder of them; with --output OUT.zarr: a volume of any size (zarr v2/v3, "
                   "OME-Zarr, TIFF), a path or an http(s):// URL.")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Folder for <id>.tif masks; or OUT.zarr: an OME-Zarr written block by block (see below).")
@click.option("--probabilities", is_flag=True, help="Also write float16 probabilities, as OUTPUT/probabilities/<id>.tif; "
                                                    "with OUT.zarr: write probabilities x255 instead of the mask.")
@click.option("--level", type=click.IntRange(min=0), help="OUT.zarr: the OME-Zarr level of the input (default 0).")
@click.option("--bbox", metavar="Z0:Z1,Y0:Y1,X0:X1", help="OUT.zarr: only this box, in the input's voxels; the values "
                                                          "inside equal a whole-volume run's.")
@click.option("--block", metavar="N|Z,Y,X", help="OUT.zarr: block side(s) in voxels, multiples of --chunk (default: "
                                                 "from the window, see docs/large-volumes.md).")
@click.option("--support-mask", default="auto", show_default=True,
              help="OUT.zarr: auto (the input above --support-threshold holds scroll), none, or a mask volume; "
                   "blocks without scroll are not predicted and the output is 0 outside it.")
@click.option("--support-threshold", type=click.IntRange(min=0), default=0, show_default=True,
              help="OUT.zarr: with --support-mask auto, input values above this hold scroll.")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), default="2", show_default=True,
              help="OUT.zarr: zarr v2 (NGFF 0.4, what VC3D and khartes read) or v3 (NGFF 0.5).")
@click.option("--chunk", type=click.IntRange(min=8), default=128, show_default=True, help="OUT.zarr: chunk side.")
@click.option("--shard", type=click.IntRange(min=8), help="OUT.zarr with --zarr-format 3: shard side (chunks in shards).")
@click.option("--resume", is_flag=True, help="OUT.zarr: go on with an output made by the same command; done blocks "
                                             "are skipped.")
@click.option("--force", is_flag=True, help="OUT.zarr: remove an earlier output of vlab predict there and start over.")
@click.option("--jobs", "-j", type=click.IntRange(min=1),
              help="OUT.zarr: worker processes sharing the blocks (one per GPU, or a share of the cores); with "
                   "--launcher slurm: array tasks (default: one per 4 blocks, at most 256).")
@click.option("--launcher", type=click.Choice(["local", "slurm", "submitit-local"]), default="local", show_default=True,
              help="OUT.zarr: slurm: a SLURM job array over the blocks through submitit ([launcher] in "
                   "vesuvius.toml); submitit-local: the same path on this machine.")
@click.option("--wait/--no-wait", default=True, help="OUT.zarr with --launcher: --no-wait returns after submitting; "
                                                     "the same command with --resume finishes the output later.")
@click.option("--dask", "dask_address", metavar="ADDRESS",
              help="OUT.zarr: the dask scheduler of the global pass (default: a local cluster, one worker per core).")
@click.option("--pass-chunk", type=click.IntRange(min=8), default=256, show_default=True,
              help="OUT.zarr: the side of the global pass's chunks; a worker holds a few such cubes at once.")
@click.option("--onednn", is_flag=True,
              help="OUT.zarr on the CPU: oneDNN's convolutions, about 1.5x faster, whose results move with the "
                   "number of threads (then --jobs N differs from one process in a few voxels per million).")
@click.option("--status", "status_of", type=click.Path(file_okay=False), metavar="OUT.zarr",
              help="Say how many blocks of an output are done, failed and left, and where failed blocks' logs are.")
@click.option("--set", "overrides", multiple=True, help="Override [inference] keys, e.g. --set tta=['flip0'].")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="The checkpoint of a run trained by the core loop: best (validation) or last (final epoch).")
@click.pass_obj
def predict(obj: ProjectContext, run_dir, source, output, probabilities, overrides, checkpoint, level, bbox, block,
            support_mask, support_threshold, zarr_format, chunk, shard, resume, force, jobs, launcher, wait,
            dask_address, pass_chunk, onednn, status_of):
    """Predict volumes with a trained run (a run folder, an experiment name for its newest finished run, or
    `best` for the leaderboard's first row): masks after the run's post-processing chain.

    \b
    --output OUT.zarr: a volume of any size, block by block, into an OME-Zarr (uint8: masks
    0/255, probabilities x255; levels 1-5; VC3D's meta.json). Each block equals the whole-volume
    prediction there; a killed run continues with --resume, losing at most the block in flight.
    --jobs N shares the blocks between N processes, --launcher slurm between the tasks of a job
    array; chain steps that need the whole volume run after the blocks, on dask (--dask).
    `vlab predict --status OUT.zarr` says how far an output is.
    """
    if status_of:
        _print_volume_status(Path(status_of))
        return
    missing = [name for name, value in (("RUN", run_dir), ("--input", source), ("--output", output)) if not value]
    if missing:
        raise UserError(f"vlab predict: give {', '.join(missing)} (vlab predict RUN --input VOLUME --output OUT), "
                        "or --status OUT.zarr to see how far an output is.")
    if str(output).rstrip("/").lower().endswith(".zarr"):
        from vesuvius_lab.core.inference.volume_predict import VolumeRequest

        request = VolumeRequest(
            input=source, output=Path(output), level=level, bbox=bbox, block=_block_sides(block),
            probabilities=probabilities, support=support_mask, support_threshold=support_threshold,
            zarr_format=int(zarr_format), chunk=chunk, shard=shard, resume=resume, force=force, checkpoint=checkpoint,
            dask=dask_address, pass_chunk=pass_chunk, onednn=onednn)
        _predict_large(obj, run_dir, request, overrides, jobs=jobs, launcher=launcher, wait=wait)
        return
    zarr_only = {"--level": level is not None, "--bbox": bbox, "--block": block, "--shard": shard, "--resume": resume,
                 "--force": force, "--zarr-format": zarr_format != "2", "--support-mask": support_mask != "auto",
                 "--jobs": jobs is not None, "--launcher": launcher != "local", "--dask": dask_address,
                 "--pass-chunk": pass_chunk != 256, "--onednn": onednn,
                 "--no-wait": not wait}
    if any(zarr_only.values()):
        raise UserError(f"{', '.join(k for k, v in zarr_only.items() if v)}: options of whole-volume prediction, "
                        "which writes an OME-Zarr: give --output OUT.zarr (a name ending in .zarr).")
    from vesuvius_lab.core import interrupts
    from vesuvius_lab.core.inference.predict import input_volumes, predict_files

    with interrupts.stop_signals():  # from the start: a stop while the run loads is taken before the first volume
        volumes = input_volumes(Path(source))
        predictor = _checked_predictor(obj, run_dir, volumes, overrides, checkpoint)
        with _volume_progress(len(volumes), "predicting") as advance:
            for volume_id in predict_files(predictor, volumes, Path(output), probabilities=probabilities):
                advance(volume_id)
    out.print(f"wrote {len(volumes)} mask(s) to {output}")


@cli.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--top", type=click.IntRange(min=2), help="Members: the N best trained experiments of the leaderboard "
                                                          "(with the folds each has), in place of the file's.")
@click.pass_obj
def ensemble(obj: ProjectContext, experiment, overrides, top):
    """Combine trained runs (folds, models, backends) as an [ensemble] file says; score and record it as a run.

    \b
    Each member run predicts a volume once (cached in its run folder), so re-weighting or
    adding a member predicts only what is new. Scored out-of-fold: for each training volume,
    each member contributes its run that did not train on it. `vlab predict` and `vlab submit`
    take the ensemble's run folder like any run's.
    """
    from vesuvius_lab.core.config.checked import read_experiment
    from vesuvius_lab.core.training.ensemble_run import build_ensemble

    overrides = list(overrides)
    if top:
        from vesuvius_lab.core.config.sweep import toml_value
        from vesuvius_lab.core.reports.best import strongest_members

        members = strongest_members(obj.project().runs_dir, top)
        err.print("members: " + ", ".join(_escape(m.get("experiment") or m["run"]) for m in members))
        overrides.append(f"ensemble.members={toml_value(members)}")
    loaded = read_experiment(experiment, overrides)
    run = build_ensemble(loaded, obj.project(), device=_device(obj))
    _print_result(run, f"({loaded.spec.model_label})")


@cli.command()
@click.argument("target", metavar="EXPERIMENT_OR_RUN")
@click.option("--trials", default=40, show_default=True, type=click.IntRange(1, 100_000),
              help="Trials per search (the main one and each cross-validation fold).")
@click.option("--workers", default=None, type=click.IntRange(1, 1024),
              help="Processes that score the volumes of a trial (default: every core, at most one per volume).")
@click.option("--storage", default=None, help="An Optuna RDB URL (e.g. postgresql://...), so several machines tune "
                                              "one study; default SQLite inside the tuning run.")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--objective", type=click.Choice(["mean", "worst_group", "mean_minus_std"]), default=None,
              help="What each search maximises (default: [tune]'s objective): the mean over volumes, the worst "
                   "group's mean, or the mean over groups minus k standard deviations (docs/tuning.md).")
@click.option("--plateau", type=click.FloatRange(0, 0.5), default=None,
              help="Choose the centre of a good region: re-score the best trials at their neighbours (each key "
                   "moved by this share of its range) and keep the best neighbourhood; 0: the best trial.")
@click.option("--force", is_flag=True, help="Start a new tuning run even when a killed or interrupted one (or one "
                                            "whose records are damaged) could be continued.")
@click.pass_obj
def tune(obj: ProjectContext, target, trials, workers, storage, overrides, objective, plateau, force):
    """Tune the post-processing chain and threshold of an experiment's [tune] table on the out-of-fold
    predictions of its trained runs, against the exact competition score.

    \b
    EXPERIMENT_OR_RUN: an experiment file with a [tune] table (its newest finished fold runs, or
    for an [ensemble] file its newest ensemble run, are tuned on), or a run. No network runs: each
    trial re-applies the chain to cached probabilities. Records a run ranked by its
    cross-validated score, and writes <file>.tuned.toml beside the experiment file. Started again
    after a kill or Ctrl-C, it continues where it stopped.
    """
    import os

    from vesuvius_lab.core.tuning.tuner import tune as run_tuning

    options = {key: value for key, value in (("objective", objective), ("plateau", plateau)) if value is not None}
    run = run_tuning(target, obj.project(), trials=trials, workers=workers or os.cpu_count() or 1, storage=storage,
                     device=_device(obj), overrides=list(overrides), force=force, options=options)
    record = run.read("tuning.json", {})
    if record.get("tuned_file"):
        out.print(f"tuned experiment file: {_escape(record['tuned_file'])}")
    _print_result(run, "(tuned)")


@cli.command()
@click.argument("run_dir")
@click.option("--input", "-i", "source", required=True, type=click.Path(), help="The test_images folder.")
@click.option("--output", "-o", default="submission.zip", show_default=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, help="Override [inference] keys, e.g. --set tta=['flip0'].")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="The checkpoint of a run trained by the core loop: best (validation) or last (final epoch).")
@click.option("--expect", "expected", type=click.IntRange(min=1),
              help="Volumes the real test set holds: also say how long they would take at this pace.")
@click.pass_obj
def submit(obj: ProjectContext, run_dir, source, output, overrides, checkpoint, expected):
    """Write the competition's submission.zip (<id>.tif, uint8, each input's shape) with a run (a run
    folder, an experiment name for its newest finished run, or `best` for the leaderboard's first row)."""
    import time

    from vesuvius_lab.core import interrupts
    from vesuvius_lab.core.inference.predict import input_volumes, write_submission
    from vesuvius_lab.core.reports.leaderboard_view import format_duration

    with interrupts.stop_signals():  # from the start: a stop while the run loads is taken before the first volume
        volumes = input_volumes(Path(source))
        predictor = _checked_predictor(obj, run_dir, volumes, overrides, checkpoint)
        started = time.monotonic()
        with _volume_progress(len(volumes), "submission") as advance:
            for volume_id in write_submission(predictor, volumes, Path(output)):
                advance(volume_id)
    pace = (time.monotonic() - started) / len(volumes)
    out.print(f"wrote {output} ({len(volumes)} volumes, {pace:.2f} s per volume"
              + (f"; {expected} volumes would take {format_duration(pace * expected)} at this pace)" if expected
                 else ")"))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(), help="The bundle folder to write (new or empty).")
@click.option("--have", type=click.Path(dir_okay=False),
              help="The target's packages (`pip freeze` there): only what it lacks is bundled. Default: the Kaggle "
                   "GPU image's usual packages, by name (docs/offline.md).")
@click.option("--no-wheels", is_flag=True, help="The runs and predict.py only (the target can install vesuvius-lab).")
@click.pass_obj
def export(obj: ProjectContext, run_dirs, output, have, no_wheels):
    """Write an offline bundle: the runs (and the runs they predict through), wheels of vesuvius-lab and of the
    dependencies the target lacks, and a predict.py/notebook that installs them with no internet and writes
    submission.zip. The first run is the one predict.py predicts with."""
    from vesuvius_lab.core.launch.bundle import export_bundle, read_have
    from vesuvius_lab.core.runs.folder import Run

    runs = [Run(_run_path(obj, text)) for text in run_dirs]
    record = export_bundle(runs, Path(output), read_have(Path(have) if have else None), wheels=not no_wheels,
                           log=lambda line: err.print(_escape(line), highlight=False))
    out.print(f"wrote the bundle {_escape(output)}: {len(record['runs'])} run(s), {len(record['wheels'])} wheel(s); "
              f"upload it as a dataset and run its predict.py (or predict.ipynb) in the notebook")


def _block_sides(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        sides = [int(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 3) or min(sides) < 1:
        raise UserError(f"--block {text}: give one side or three (z,y,x) in voxels, e.g. --block 256 or "
                        "--block 256,512,512.")
    return tuple(sides * 3 if len(sides) == 1 else sides)


def _predict_large(obj: ProjectContext, run_dir: str, request, overrides, *, jobs: int | None = None,
                   launcher: str = "local", wait: bool = True) -> None:
    """``vlab predict ... --output OUT.zarr``: plan, predict the blocks not done yet (in this process, in
    ``jobs`` local workers, or as a job array), then the global pass and the pyramid."""
    from vesuvius_lab.core import interrupts
    from vesuvius_lab.core.inference.run_kinds import load_run
    from vesuvius_lab.core.inference.volume_predict import finish, pending_blocks, prepare
    from vesuvius_lab.core.launch.predict_jobs import WorkerOrder, predict_here, predict_with_workers

    path = _run_path(obj, run_dir)
    device = _device(obj)
    checked = _checked_overrides(path, overrides)
    predictor = load_run(path, device=device, overrides=checked, checkpoint_name=request.checkpoint)
    with interrupts.stop_signals(at="after the blocks in flight"):
        prepared = prepare(predictor, request)
        todo = pending_blocks(prepared)
        total = len(prepared.plan)
        before = total - len(todo)
        err.print(f"{_escape(str(request.output))}: {total} block(s) of {'x'.join(map(str, prepared.plan.block))} over "
                  f"{prepared.plan.region} of {'x'.join(map(str, prepared.source.shape))}; {before} done "
                  f"before, halo {prepared.halo} voxel(s) for the chain"
                  + (f"; then a global pass for {', '.join(s.label for s in prepared.global_steps)}"
                     if prepared.global_steps else ""))
        order = WorkerOrder(str(path), obj.project().settings.device, tuple(checked), request)
        failed: dict[str, str] = {}
        problems: list[str] = []
        with _block_progress(total, before) as progress:
            try:
                if todo and launcher != "local":
                    problems = _submitted_blocks(obj, prepared, todo, order, launcher, jobs, wait, progress)
                    if not wait:
                        return
                elif todo:
                    outcome = (predict_with_workers(prepared, todo, order, jobs, device, on_block=progress.block)
                               if (jobs or 1) > 1 else predict_here(prepared, todo, on_block=progress.block))
                    failed = outcome.failed
                    problems = [f"a worker ended with exit code {code}: its block in flight is left"
                                for code in outcome.died]
            except KeyboardInterrupt:
                err.print(f"stopped with {total - len(pending_blocks(prepared))} of {total} block(s) done; the "
                          "same command with --resume goes on")
                raise
        left = pending_blocks(prepared)
        if left:
            _blocks_left(request.output, total, left, failed, problems)
        built = finish(prepared)
    counts = progress.counts
    if not built:
        out.print(f"{_escape(str(request.output))} is complete already; nothing to do")
        return
    out.print(f"wrote {_escape(str(request.output))}: {counts['predicted']} block(s) predicted, {counts['empty']} "
              f"without scroll, {before} done before"
              + (f"; global pass: {', '.join(s.label for s in prepared.global_steps)}" if prepared.global_steps else "")
              + "; levels 0-5, meta.json")


class _BlockProgress:
    """One progress bar over the blocks, wherever they run."""

    def __init__(self, bar, task, before: int):
        self.bar, self.task, self.before = bar, task, before
        self.counts = {"predicted": 0, "empty": 0, "failed": 0}

    def block(self, block, predicted, error=None) -> None:
        self.counts["failed" if error else "predicted" if predicted else "empty"] += 1
        self.bar.update(self.task, advance=1, description=self._describe())

    def done_so_far(self, done: int) -> None:
        self.bar.update(self.task, completed=done, description=f"blocks ({done - self.before} done now)")

    def _describe(self) -> str:
        counts = self.counts
        failed = f", {counts['failed']} failed" if counts["failed"] else ""
        return f"blocks ({counts['predicted']} predicted, {counts['empty']} without scroll{failed})"


@contextmanager
def _block_progress(total: int, before: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        yield _BlockProgress(bar, bar.add_task("blocks", total=total, completed=before), before)


def _submitted_blocks(obj: ProjectContext, prepared, todo, order, launcher: str, jobs, wait: bool, progress) -> list[str]:
    from vesuvius_lab.core.launch.predict_array import submit_blocks, wait_for

    project = obj.project()
    tasks = jobs or min(256, max(1, -(-len(todo) // 4)))
    folder = project.launcher_dir / "predict"
    submitted = submit_blocks(prepared, todo, order, kind=launcher, tasks=tasks, settings=project.settings.launcher,
                              folder=folder)
    ids = [str(job.job_id) for job in submitted]
    err.print(f"submitted {len(todo)} block(s) as {len(ids)} task(s): {', '.join(ids[:4])}"
              f"{' ...' if len(ids) > 4 else ''} (logs under {_escape(str(folder))})")
    if not wait:
        for job_id in ids:
            click.echo(job_id)
        err.print(f"`vlab predict --status {_escape(str(order.request.output))}` says how far it is; the same command "
                  "with --resume then finishes the output (the global pass and the pyramid).")
        return []
    return wait_for(submitted, prepared, on_progress=progress.done_so_far)


def _blocks_left(output, total: int, left, failed: dict, problems: list[str]) -> None:
    lines = [f"{output}: {len(left)} of {total} block(s) are not done, so the output is not finished."]
    for name, error in list(failed.items())[:5]:
        lines.append(f"  block {name} failed: {error}")
    if len(failed) > 5:
        lines.append(f"  ... and {len(failed) - 5} more failed block(s)")
    lines += [f"  {problem}" for problem in problems]
    lines.append(f"`vlab predict --status {output}` lists them with their logs; the same command with --resume "
                 "predicts only those (nothing done is lost).")
    raise UserError("\n".join(lines))


def _print_volume_status(output: Path) -> None:
    from vesuvius_lab.core.inference.volume_status import volume_status

    status = volume_status(output)
    out.print(f"{_escape(str(output))}: {status.blocks} block(s): {status.done} done ({status.predicted} predicted, "
              f"{status.empty} without scroll), {len(status.failed)} failed, {len(status.left)} left"
              + ("; complete" if status.complete else ""))
    for name, record in status.failed.items():
        out.print(f"  failed {name}: {_escape(str(record.get('error')))}"
                  + (f" (log: {_escape(str(record['log']))})" if record.get("log") else "")
                  + (f" on {_escape(str(record.get('host')))}" if record.get("host") else ""))
    if status.left:
        shown = ", ".join(status.left[:8]) + (" ..." if len(status.left) > 8 else "")
        out.print(f"  left: {shown}")
    if status.submissions:
        last = status.submissions[-1]
        out.print(f"  last submission: {len(last.get('jobs', []))} task(s) over {last.get('blocks')} block(s), job(s) "
                  f"{', '.join(last.get('jobs', [])[:4])}; logs under {_escape(str(last.get('log_folder')))}")
    if not status.complete and (status.left or status.failed):
        out.print("  the command that made it, with --resume, predicts what is left")


def _run_path(obj: ProjectContext, text: str) -> Path:
    """A run folder, a path under the runs directory, an experiment name (its newest finished run), or
    ``best``: the run of the leaderboard's first row."""
    from vesuvius_lab.core.reports.best import BEST, best_run
    from vesuvius_lab.core.runs.records import resolve_run

    runs_dir = obj.project().runs_dir
    if text == BEST and not (Path(text) / "spec.json").is_file() and not (runs_dir / BEST).is_dir():
        run, row = best_run(runs_dir)
        err.print(f"best: {_escape(row.experiment)} (score {row.stats['score'].mean:.4f}, the leaderboard's first "
                  f"row), run {_escape(str(run.path))}")
        return run.path
    return resolve_run(text, runs_dir).path


def _device(obj: ProjectContext) -> str:
    from vesuvius_lab.core.training.trainer import resolve_device

    return resolve_device(obj.project().settings.device)


def _checked_predictor(obj: ProjectContext, run_dir: str, volumes, overrides, checkpoint: str):
    """The run opened to predict, after the cheap checks of everything given, before anything is written:
    every input's TIFF header, the --set values (checked as `vlab validate` checks a file), the checkpoint,
    and that each input is not smaller than the window."""
    from vesuvius_lab.core.data.tiff import check_headers
    from vesuvius_lab.core.inference.predict import check_window_fits
    from vesuvius_lab.core.inference.run_kinds import check_openable, load_run
    from vesuvius_lab.core.runs.folder import Run

    shapes = check_headers(path for _, path in volumes)
    path = _run_path(obj, run_dir)
    settings = _checked_overrides(path, overrides)
    check_openable(Run(path), checkpoint)
    predictor = load_run(path, device=_device(obj), overrides=settings, checkpoint_name=checkpoint)
    for volume_id, volume_path in volumes:
        check_window_fits(predictor.spec, volume_id, shapes[Path(volume_path)])
    return predictor


def _checked_overrides(path: Path, overrides) -> dict:
    """--set of predict and submit, checked against the run's spec as `vlab validate` checks a file."""
    from vesuvius_lab.core.inference.run_kinds import inference_overrides

    return inference_overrides(path, _inference_overrides(overrides))


def _inference_overrides(overrides) -> list[str]:
    """--set texts of predict and submit: [inference] keys only (with or without the inference. prefix)."""
    from vesuvius_lab.core.config.experiment import parse_override

    for text in overrides:
        keys, _ = parse_override(text)
        keys = keys[1:] if keys[0] == "inference" else keys
        if len(keys) != 1:
            raise UserError(f"--set {text}: only [inference] keys can be changed at prediction time, "
                            "e.g. --set inference.tta=['flip0'] or --set overlap=0.25.")
    return list(overrides)


class _volume_progress:
    """A progress bar over volumes, on stderr."""

    def __init__(self, total: int, description: str):
        self.total, self.description = total, description

    def __enter__(self):
        from rich.progress import Progress

        self.progress = Progress(console=err, transient=True)
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda volume_id: self.progress.update(task, advance=1, description=f"{self.description} {volume_id}")

    def __exit__(self, *exc):
        self.progress.stop()


# --------------------------------------------------------------------------- plugins


@cli.group(invoke_without_command=True)
@click.option("--group", "group", help="Only this group: models, losses, blenders, postprocessors, trackers.")
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
    from rich.text import Text

    from vesuvius_lab.core.reports.tables import ESSENTIAL, KEY, OPTIONAL, WRAP, Col, FittedTable

    # group, name, package whole, a broken plugin's error whole (wrapped between words); the summary
    # shortened with "…" (to no less than 24 characters) or on a table below
    table = FittedTable([Col("group", KEY), Col("name", KEY), Col("package", ESSENTIAL), Col("status", WRAP),
                         Col("summary", OPTIONAL, min_width=24)], title="vesuvius-lab plugins")
    for row in rows:
        status = Text(row.status, style="green" if row.status == "ok" else "red")
        table.add_row(row.group, row.name, f"{row.package} {row.version}", status, row.summary)
    out.print(table, crop=False)


@plugins.command("show")
@click.argument("group")
@click.argument("name")
def plugins_show(group, name):
    """Show a plugin's params with their types, defaults and help."""
    from vesuvius_lab.core import registry
    from vesuvius_lab.core.reports.tables import KEY, WRAP, Col, FittedTable

    found = registry.load(group, name)
    out.print(f"[bold]{registry.group_name(group)} / {_escape(name)}[/]  {_escape(found.summary)}", soft_wrap=False)
    # the param whole; its type, default and help wrapped between words when the page is narrow
    table = FittedTable([Col("param", KEY), Col("type", WRAP), Col("default", WRAP), Col("help", WRAP)])
    for field_name, info in found.Params.model_fields.items():
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        table.add_row(field_name, _type_name(info.annotation), default, info.description or "")
    out.print(table if found.Params.model_fields else "  (no params)", crop=False)


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --------------------------------------------------------------------------- post-processing


@cli.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--input", "-i", "input_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of prediction TIFFs: float probabilities in [0, 1], or uint8 0/1 masks.")
@click.option("--output", "-o", "output_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the uint8 0/1 masks (same file names).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--uint8-probabilities", is_flag=True,
              help="Read uint8 files as probabilities scaled to 0-255 (p = value/255), not as 0/1 masks.")
@click.pass_obj
def postprocess(obj: ProjectContext, experiment, input_dir, output_dir, overrides, uint8_probabilities):
    """Apply an experiment's [[postprocess]] chain to prediction TIFFs, writing uint8 masks."""
    from vesuvius_lab.core.config.checked import read_experiment
    from vesuvius_lab.core.data.tiff import check_headers
    from vesuvius_lab.core.inference.postprocess import (PREDICTION_DTYPES, build_chain, postprocess_folder,
                                                         prediction_files)

    project = obj.project()
    spec = read_experiment(experiment, list(overrides)).spec
    check_headers(prediction_files(Path(input_dir)), PREDICTION_DTYPES)  # every file, before one is written
    chain = build_chain(spec.postprocess, threshold=spec.inference.threshold,
                        device=project.settings.device, runs_dir=project.runs_dir)
    written = postprocess_folder(chain, Path(input_dir), Path(output_dir), uint8_probabilities=uint8_probabilities)
    steps = " -> ".join(step.label for step in chain.steps) or "no steps"
    out.print(f"wrote {len(written)} mask(s) to {output_dir} ({steps}; threshold {spec.inference.threshold})")


# --------------------------------------------------------------------------- data


@cli.group()
def data():
    """Make demo data and check a data folder."""


@data.command("synth")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder to write (default: the project's data root).")
@click.option("--n", "n", type=click.IntRange(min=1), default=8, show_default=True, help="Training volumes.")
@click.option("--shape", type=click.IntRange(min=4), nargs=3, default=(64, 128, 128), show_default=True,
              metavar="D H W", help="Volume shape.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files.")
@click.option("--scrolls", type=click.IntRange(min=1), default=3, show_default=True,
              help="Scrolls the training volumes are spread over.")
@click.option("--test", "n_test", type=click.IntRange(min=1), default=2, show_default=True, help="Test volumes.")
@click.option("--zarr", "zarr_out", type=click.Path(file_okay=False),
              help="Instead of a dataset, write one whole synthetic scroll of --shape to this OME-Zarr (with its "
                   "label under labels/surface), block by block.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Processes writing volumes at once (default: one per available core; the files are the same).")
@click.option("--family", "families", multiple=True, metavar="NAME",
              help="Style family of the scrolls, repeatable (scroll k gets the k-th, in turn): base (default), "
                   "contrast, noise, spacing or damage; each moves one kind of look outside the base ranges.")
@click.pass_obj
def data_synth(obj: ProjectContext, out_dir, n, shape, seed, scrolls, n_test, zarr_out, workers, families):
    """Write a synthetic scroll dataset in the competition layout (images, labels, csv files), or with --zarr
    one whole scroll as an OME-Zarr volume."""
    if zarr_out:
        if out_dir:
            raise UserError("--zarr writes one volume and --out a dataset folder: give one of them.")
        from vesuvius_lab.core.data.synthetic_zarr import LABEL_NAME, stored_chunks, write_scroll_zarr

        path = write_scroll_zarr(Path(zarr_out), tuple(shape), seed=seed)
        stored, grid = stored_chunks(path)
        out.print(f"wrote a synthetic scroll of {'x'.join(map(str, shape))} voxels (uint8 OME-Zarr; {stored} of "
                  f"{grid} chunks stored, the rest is air) to {_escape(str(path))} and its label to "
                  f"{_escape(str(path / 'labels' / LABEL_NAME))}")
        return
    from vesuvius_lab.core.data.synthetic import write_dataset

    target = Path(out_dir) if out_dir else obj.project().data_root
    write_dataset(target, n=n, shape=tuple(shape), seed=seed, scrolls=scrolls, n_test=n_test, workers=workers,
                  families=families or ("base",))
    named = " (families: " + ", ".join(families) + ")" if families else ""
    out.print(f"wrote {n} training and {n_test} test volume(s) of {'x'.join(map(str, shape))} over "
              f"{scrolls} scroll(s){named} to {_escape(str(target))}")


@data.command("check")
@click.argument("root", required=False, type=click.Path(file_okay=False))
@click.pass_obj
def data_check(obj: ProjectContext, root):
    """Check a data folder (default: the project's data root) and report every problem at once."""
    from vesuvius_lab.core.data.dataset import check_dataset

    project = obj.project()
    report = check_dataset(Path(root) if root else project.data_root, cache_dir=project.cache_dir)
    for note in report.notes:
        err.print(f"[yellow]note[/] {_escape(note)}")
    if not report.ok:
        for problem in report.problems:
            err.print(f"[bold red]error[/] {_escape(problem)}")
        err.print(f"{len(report.problems)} problem(s) in {_escape(str(report.root))}.")
        sys.exit(2)
    from vesuvius_lab.core.reports.tables import KEY, WRAP, Col, FittedTable

    summary = report.summary
    table = FittedTable([Col("what", KEY), Col("found", WRAP)], title=f"{report.root}: ok", show_header=False)
    table.add_row("training volumes", str(summary.train))
    table.add_row("test volumes", str(summary.test))
    table.add_row("scrolls", ", ".join(f"{s} ({c})" for s, c in sorted(summary.scrolls.items())))
    table.add_row("shapes", ", ".join(f"{'x'.join(map(str, s))} ({c})" for s, c in summary.shapes.most_common()))
    fractions = summary.label_fractions
    table.add_row("label voxels", f"0: {fractions[0]:.1%}  1 surface: {fractions[1]:.1%}  2 unlabeled: {fractions[2]:.1%}")
    out.print(table, crop=False)


# --------------------------------------------------------------------------- runs and the leaderboard


@cli.command()
@click.argument("runs_dir", required=False, type=click.Path(file_okay=False))
@click.option("--runs", "per_run", is_flag=True, help="One row per run instead of one per experiment.")
@click.option("--sort", help="Column or spec key to order by, best first (default: score), e.g. wall_time, train.lr.")
@click.option("--filter", "filters", multiple=True, metavar="KEY OP VALUE",
              help="Keep rows where it holds, e.g. score>0.5, model=smp_*, train.lr<=1e-3; repeat: all must hold.")
@click.option("--top", type=click.IntRange(min=1), help="Only the first N rows.")
@click.option("--baseline", help="Experiment (or run id) that Δ is measured against (default: the best row).")
@click.option("--md", "fmt", flag_value="md", help="Print Markdown.")
@click.option("--csv", "fmt", flag_value="csv", help="Print CSV (raw numbers; warnings on stderr).")
@click.option("--json", "fmt", flag_value="json", help="Print JSON (rows and warnings).")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Also write the table to this HTML file.")
@click.option("--task", default="segmentation", show_default=True, type=click.Choice(["segmentation", "hole_stitching"]),
              help="Rank the runs of this [data] task; scores of different tasks are not comparable.")
@click.option("--wide", is_flag=True, help="One table with every column and every differing setting whole, "
                                           "however wide (for logs, `less -S`).")
@click.pass_obj
def leaderboard(obj: ProjectContext, runs_dir, per_run, sort, filters, top, baseline, fmt, html_file, task, wide):
    """Rank experiments by score, folds aggregated (mean ± std, n), and show what differs between them.

    \b
    Columns: plugins, score and its parts, Δ to the best (or --baseline), epochs, wall time,
    parameters, git commit, then every setting that differs between the rows shown. Failed,
    killed, unfinished runs and experiments with missing folds are listed below the table.
    The table fits the terminal (COLUMNS, or 120 columns in a log): rank, experiment, scores
    (mean ± std) and folds are never shortened and come first; settings that do not fit whole
    move to a table below, keyed by rank and experiment. --wide: one table, everything whole.
    \b
    --filter KEY OP VALUE (several: all must hold); KEY is a column (score, topo, dice, voi,
    model, loss, blend, postprocess, experiment, epochs, wall_time, params) or a spec key
    (train.lr, model.params.encoder). OP: = and != (numbers, or text with * ? patterns),
    > >= < <= (numbers), ~ (text contains, any case).
    """
    from vesuvius_lab.core.files import write_text_atomic
    from vesuvius_lab.core.reports.leaderboard import build_leaderboard
    from vesuvius_lab.core.reports.leaderboard_view import html_page, print_leaderboard

    board = build_leaderboard(Path(runs_dir) if runs_dir else obj.project().runs_dir, per_run=per_run, sort=sort,
                              filters=filters, top=top, baseline=baseline, task=task)
    print_leaderboard(board, out, err, fmt, wide=wide)
    if html_file:
        write_text_atomic(Path(html_file), html_page(board))
        err.print(f"wrote {_escape(html_file)}")


@cli.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--wide", is_flag=True, help="Every table whole on one line per row, however wide.")
@click.pass_obj
def compare(obj: ProjectContext, run_a, run_b, wide):
    """Compare two runs (folders, or <experiment>/<run-id> in the runs dir): settings and per-volume scores."""
    from vesuvius_lab.core.reports.compare import compare_runs, legend, tables
    from vesuvius_lab.core.runs.records import resolve_run

    runs_dir = obj.project().runs_dir
    comparison = compare_runs(resolve_run(run_a, runs_dir), resolve_run(run_b, runs_dir))
    out.print(legend(comparison))
    for table in tables(comparison, wide=wide):
        out.print(table, crop=False)


@cli.command()
@click.argument("run_dir")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Folder for the pictures (default: RUN/report).")
@click.option("--volumes", type=click.IntRange(min=0), default=3, show_default=True,
              help="Validation volumes to picture, spread from the worst to the best score.")
@click.pass_obj
def report(obj: ProjectContext, run_dir, output, volumes):
    """Pictures of a run: validation slices with errors coloured, training curves, and an index.html."""
    import os

    from vesuvius_lab.core.reports.run_report import write_report
    from vesuvius_lab.core.runs.records import resolve_run

    project = obj.project()
    run = resolve_run(run_dir, project.runs_dir)
    data_root = os.environ.get("VLAB_DATA")  # --data or the environment; otherwise the run's own data root
    files = write_report(run, Path(output) if output else run.path / "report", device=_device(obj),
                         data_root=Path(data_root) if data_root else None, volumes=volumes)
    out.print(f"wrote {len(files.volumes)} volume picture(s) and training curves; open {_escape(str(files.index))}")


@cli.command("run")
@click.argument("experiments", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--folds", help="Folds to train: all, or e.g. 0,1,2 (default: each experiment's data.fold).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--nproc", type=click.IntRange(min=1), help="DDP processes on this machine (beats train.nproc).")
@click.option("--force", is_flag=True, help="Start new runs even when a finished (or resumable) run with the same spec exists.")
@click.option("--jobs", "-j", "at_once", type=click.IntRange(min=1),
              help="Jobs at once, each in its own process on its own GPU (CUDA) or share of the cores (CPU); "
                   "a DDP job takes nproc of them. Default 1 (with --launcher slurm: all).")
@click.option("--launcher", type=click.Choice(["local", "slurm", "submitit-local"]), default="local", show_default=True,
              help="slurm: one SLURM job per run through submitit, set up by [launcher] in vesuvius.toml; "
                   "submitit-local: the same path through submitit's local executor, on this machine.")
@click.option("--wait/--no-wait", default=True, help="--no-wait: submit the jobs, print their ids and return.")
@click.pass_obj
def run_many(obj: ProjectContext, experiments, folds, overrides, nproc, force, at_once, launcher, wait):
    """Train and evaluate several experiments ([sweep]s expanded) and folds, then rank them.

    A finished run with the same name, fold and resolved spec is skipped; a killed or interrupted
    one is resumed from its last checkpoint (--force starts new runs). A failure is reported and
    the other runs go on; the exit status is 2 if anything failed. With --jobs N, N jobs run at
    once (one display for all; each job's output in its run's log.txt); an ensemble waits for the
    jobs before it.
    """
    from contextlib import nullcontext

    from vesuvius_lab.core.launch.batch import parse_folds, plan
    from vesuvius_lab.core.launch.parallel import run_batch, start_warm_workers
    from vesuvius_lab.core.reports.leaderboard import build_leaderboard
    from vesuvius_lab.core.reports.leaderboard_view import print_leaderboard

    project = obj.project()

    def started(position: int, job, resume) -> None:
        again = f", resuming {_escape(str(resume.path))}" if resume else ""
        err.print(f"[bold]\\[{position + 1}/{len(jobs)}] {_escape(job.label)}[/]{again}")

    def done(outcome) -> None:
        where = f" ({_escape(str(outcome.run.path))})" if outcome.run else ""
        if outcome.status == "failed":
            err.print(f"[bold red]failed[/] {_escape(outcome.job.label)}: {_escape(outcome.error or '')}{where}")
        elif outcome.status == "skipped":
            err.print(f"[dim]skipped {_escape(outcome.job.label)}: {_escape(outcome.error or 'finished already')}{where}[/]")
        elif outcome.status in ("killed", "interrupted", "held"):
            err.print(f"[bold yellow]{outcome.status}[/] {_escape(outcome.job.label)}: {_escape(outcome.error or '')}{where}")
        elif outcome.status == "submitted":
            click.echo(f"{outcome.job_id}\t{outcome.job.label}")

    warm = start_warm_workers(project, at_once, launcher, len(experiments)) if wait else None  # they import meanwhile
    with warm or nullcontext():  # closed however the batch ends
        jobs, problems = plan(list(experiments), project, overrides=list(overrides), folds=parse_folds(folds),
                              nproc=nproc)
        for problem in problems:
            err.print(f"[bold red]error[/] {_escape(str(problem))}")
        err.print(f"{len(jobs)} run(s) planned" + (f"; {len(problems)} problem(s) above are skipped" if problems else ""))
        outcomes = run_batch(jobs, project, at_once=at_once, launcher=launcher, wait=wait, force=force,
                             on_start=started, on_done=done, warm=warm)
    if not wait:
        submitted = sum(o.status == "submitted" for o in outcomes)
        err.print(f"{submitted} job(s) submitted; `vlab leaderboard` shows their runs as they train.")
        sys.exit(2 if any(o.status == "failed" for o in outcomes) or problems else 0)
    if jobs and project.runs_dir.is_dir():
        names = list(dict.fromkeys(job.spec.name for job in jobs))
        print_leaderboard(build_leaderboard(project.runs_dir, experiments=names), out, err)
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {status: sum(o.status == status for o in outcomes)
              for status in ("trained", "resumed", "skipped", "failed", "killed", "interrupted")}
    err.print(", ".join(f"{n} {status}" for status, n in counts.items() if n or status in ("trained", "skipped", "failed")))
    if failed or problems or counts["killed"]:
        sys.exit(2)


# --------------------------------------------------------------------------- scoring


@cli.command()
@click.argument("pred", type=click.Path())
@click.argument("label", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON instead of a table.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Volumes scored at once, each in its own process.")
def evaluate(pred, label, as_json, workers):
    """Score predictions against labels with the competition metric.

    PRED and LABEL are two TIFF files, or two folders whose <id>.tif files are paired by id.
    Ids on one side only, unreadable files and shape mismatches are all reported, exit status 2.
    """
    from rich.progress import Progress

    from vesuvius_lab.core.metric.evaluate import evaluate_pairs, pair_volumes
    from vesuvius_lab.core.reports.score_view import scores_json, scores_table

    pairs = pair_volumes(Path(pred), Path(label))
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("scoring volumes", total=len(pairs))
        result = evaluate_pairs(pairs, workers=workers, on_volume=lambda _: progress.advance(task))
    if result.scores:
        if as_json:
            click.echo(json.dumps(scores_json(result.scores), indent=2))
        else:
            out.print(scores_table(result.scores), crop=False)
    if result.problems:
        raise UserError(f"{len(result.problems)} volume(s) could not be scored:\n  " + "\n  ".join(result.problems))


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run ``vlab``; a user's mistake prints one clear message and exits with status 2."""
    # timm (under segmentation-models-pytorch) still uses torch.jit.interface; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.*", category=FutureWarning)
    try:
        cli.main(args=argv, prog_name="vlab", standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns a KeyboardInterrupt (Ctrl-C, or SIGTERM) into Abort
        cause = exc.__cause__
        err.print("interrupted" if isinstance(cause, KeyboardInterrupt) else "aborted")
        sys.exit(getattr(cause, "exit_code", 130))
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {_escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM in the commands that handle it (interrupts.Interrupted)
        err.print("interrupted")
        sys.exit(getattr(exc, "exit_code", 130))
    except OSError as exc:
        if not is_user_os_error(exc):
            raise
        err.print(f"[bold red]error:[/] {_escape(os_error_message(exc))}")
        sys.exit(2)
