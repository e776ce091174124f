"""``vlab predict RUN --input VOLUME --output OUT.zarr``: a volume of any size, block by block, resumably.

:func:`prepare` checks everything cheap first (the input, the box, the chain's halos, the output and
its records), plans the blocks and creates or reopens the output (never truncating it);
:func:`predict_one` runs a block (any block, in any process: this one, one of several workers, a
task of a job array: :mod:`vesuvius_lab.core.launch.predict_jobs`) and records it done; :func:`finish`
runs the global pass and builds the pyramid and the viewers' metadata once every block is done. Each block:

1. is skipped if a done record covers it (a rerun with ``--resume``);
2. holds no scroll when no voxel of its core and halo is in the support (``--support-mask``: the input above
   ``--support-threshold``, or a mask volume): then the model does not run and its chunks stay empty;
3. otherwise predicts its core plus the halo that the post-processing chain's steps declare
   (:meth:`vesuvius_lab.core.registry.Plugin.halo_of`), exactly as the whole volume would be
   predicted there (:mod:`vesuvius_lab.core.inference.blocks`), zeroes what lies outside the support,
   applies the chain (mask mode) and writes its core as uint8: masks 0/255, probabilities x255.

A chain with a step that needs the whole volume (a "global" halo) is cut before that step: the
blocks apply the steps before it and write their result to the stage, and :func:`finish` runs the
rest over the stage on dask (:mod:`vesuvius_lab.core.inference.global_pass`) before the pyramid.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from vesuvius_lab import __version__
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.block_records import BlockRecords
from vesuvius_lab.core.inference.blocks import Block, BlockPlan, Box, Reader, parse_bbox
from vesuvius_lab.core.inference.global_pass import (PASS_CHUNK, apply_local, chunked_steps, local_halo, output_dtype,
                                                     remove_stage, run_global_pass, split_chain, stage_of)
from vesuvius_lab.core.inference.run_kinds import RunPredictor, referenced_runs
from vesuvius_lab.core.runs.folder import TUNING_RECORD, Run

DEFAULT_CHUNK = 128
#: The default block holds at most this many voxels: its input, float32 sums and weights stay near 3 GB.
BLOCK_VOXELS = 2 ** 28
#: The default block side holds at least this many window steps, so the windows that two blocks share
#: (computed by both) cost a few percent.
BLOCK_STEPS = 32
PYRAMID_LEVELS = 5


@dataclass(frozen=True)
class VolumeRequest:
    """What ``vlab predict`` was asked for a large volume."""

    input: str
    output: Path
    level: int | None = None
    bbox: str | None = None
    block: tuple[int, int, int] | None = None  # None: chosen from the window (see :func:`default_block`)
    probabilities: bool = False
    support: str = "auto"  # "auto", "none", or a mask volume's location
    support_threshold: int = 0
    zarr_format: int = 2
    chunk: int = DEFAULT_CHUNK
    shard: int | None = None
    resume: bool = False
    force: bool = False
    checkpoint: str = "best"
    dask: str | None = None  # the global pass's scheduler address; None: a local cluster
    dask_workers: int | None = None  # the local cluster's worker processes; None: one per core
    pass_chunk: int = PASS_CHUNK  # the side of the global pass's chunks: what one of its workers holds
    onednn: bool = False  # CPU: oneDNN's convolutions, faster, but their results move with the thread count


@dataclass
class Prepared:
    """A planned block-wise prediction, its output open."""

    request: VolumeRequest
    predictor: RunPredictor
    source: Reader
    plan: BlockPlan
    halo: int
    support: "Support"
    output: object  # OmeZarrOutput
    records: BlockRecords
    fingerprint: str
    local_steps: tuple = ()  # the chain's steps the blocks apply (all of them without a global step)
    global_steps: tuple = ()  # from the chain's first global step on: the global pass applies them
    stage: object = None  # with global steps: the zarr array the blocks write, the pass reads


# --------------------------------------------------------------------------- checks before any work


def chain_parts(predictor: RunPredictor, probabilities: bool) -> tuple[tuple, tuple, int]:
    """(the steps the blocks apply, the steps the global pass applies, the blocks' halo in voxels)."""
    if probabilities:
        return (), (), 0
    local, rest = split_chain(predictor.chain)
    return local, rest, local_halo(local)


def default_block(inference, window, chunk: int, shard: int | None) -> tuple[int, int, int]:
    """Per axis, a multiple of the chunk (shard) holding :data:`BLOCK_STEPS` window steps, halved along its
    longest side while it holds more than :data:`BLOCK_VOXELS` voxels."""
    unit = shard or chunk
    window = tuple(window or inference.window)
    overlap = inference.overlap if isinstance(inference.overlap, (list, tuple)) else (inference.overlap,) * 3
    steps = [1, 1, 1]
    for axis in getattr(inference, "axes", (0,)):  # each pass puts another volume axis first
        order = (axis, *(a for a in range(3) if a != axis))
        for side, o, volume_axis in zip(window, overlap, order):
            steps[volume_axis] = max(steps[volume_axis], max(1, int(side * (1 - o))))
    block = [max(unit, -(-BLOCK_STEPS * step // unit) * unit) for step in steps]
    while math.prod(block) > BLOCK_VOXELS and max(block) > unit:
        longest = block.index(max(block))
        block[longest] = max(unit, block[longest] // 2 // unit * unit)
    return tuple(block)  # type: ignore[return-value]


def _check_block(block: tuple[int, int, int], chunk: int, shard: int | None) -> None:
    unit = shard or chunk
    if any(side % unit for side in block):
        kind = "shard" if shard else "chunk"
        raise UserError(f"--block {' '.join(map(str, block))}: every side must be a multiple of the output's "
                        f"{kind} ({unit}), so that no two blocks write one {kind}. Give e.g. --block "
                        f"{' '.join(str(max(unit, round(s / unit) * unit)) for s in block)}.")


# --------------------------------------------------------------------------- support


class Support:
    """Which voxels hold scroll: everywhere (``none``), the input above a threshold (``auto``), or a mask
    volume of the input's shape or a whole-number fraction of it (a lower resolution level)."""

    def __init__(self, kind: str, source: Reader, threshold: int = 0, mask: Reader | None = None):
        self.kind, self.source, self.threshold, self.mask = kind, source, threshold, mask
        self.factors = (1, 1, 1)
        if mask is not None:
            factors = tuple(max(1, round(s / m)) for s, m in zip(source.shape, mask.shape))
            if any(-(-s // f) != m for s, m, f in zip(source.shape, mask.shape, factors)):
                raise UserError(f"--support-mask: the mask's shape {tuple(mask.shape)} is neither the input's "
                                f"{tuple(source.shape)} nor a whole-number fraction of it. Give a mask of the "
                                "input's level (or a level 2, 4, ... times smaller).")
            self.factors = factors

    def of(self, box: Box) -> np.ndarray | None:
        """A bool array of the box's shape (None: everything is support)."""
        if self.kind == "none":
            return None
        if self.mask is None:
            return self.source.read(box.slices) > self.threshold
        low = tuple(slice(a // f, -(-b // f)) for a, b, f in zip(box.start, box.stop, self.factors))
        coarse = self.mask.read(low) != 0
        for axis, f in enumerate(self.factors):
            coarse = np.repeat(coarse, f, axis=axis)
        return coarse[tuple(slice(a - s.start * f, b - s.start * f)
                            for a, b, s, f in zip(box.start, box.stop, low, self.factors))]


def open_support(request: VolumeRequest, source: Reader) -> Support:
    from vesuvius_lab.core.data.volumes import open_volume

    if request.support in ("auto", "none"):
        return Support(request.support, source, request.support_threshold)
    return Support("mask", source, mask=open_volume(request.support))


# --------------------------------------------------------------------------- the fingerprint


def run_digest(run: Run, checkpoint: str, seen: set | None = None) -> str:
    """A digest of what a run predicts with: its spec, its weights (every checkpoint and backend file) and,
    for an ensemble or a tuned run, those of the runs it combines."""
    seen = set() if seen is None else seen
    digest = hashlib.sha256(checkpoint.encode())
    if run.path in seen:
        return digest.hexdigest()
    seen.add(run.path)
    for name in ("spec.json", "members.json", TUNING_RECORD):
        if (run.path / name).is_file():
            digest.update(name.encode() + (run.path / name).read_bytes())
    for folder in ("checkpoints", "backend"):
        for path in sorted((run.path / folder).rglob("*")):
            if path.is_file() and path.suffix in (".pt", ".pth", ".json"):
                with open(path, "rb") as handle:
                    digest.update(str(path.relative_to(run.path)).encode() + hashlib.file_digest(handle, "sha256").digest())
    for member in referenced_runs(run):
        digest.update(run_digest(Run(member), checkpoint, seen).encode())
    return digest.hexdigest()


def fingerprint_parts(predictor: RunPredictor, request: VolumeRequest, source, block) -> dict:
    spec = predictor.spec
    inference = spec.inference.model_dump(mode="json")
    inference.pop("batch_size", None)  # changes how many windows run at once, not what they give
    return {
        "run": str(predictor.run.path), "run_digest": run_digest(predictor.run, request.checkpoint),
        "inference": inference, "window": list(spec.inference_window),
        "output": "probabilities" if request.probabilities else "mask",
        "chain": None if request.probabilities else [step.ref.model_dump(mode="json") for step in predictor.chain.steps],
        "threshold": None if request.probabilities else spec.inference.threshold,
        "input": source.provenance(),
        "support": {"mask": request.support, "threshold": request.support_threshold},
        "convolutions": "onednn" if request.onednn else "thread-independent",
        "layout": {"block": list(block), "chunk": request.chunk, "shard": request.shard,
                   "zarr_format": request.zarr_format},
    }


def fingerprint_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- prepare


def prepare(predictor: RunPredictor, request: VolumeRequest) -> Prepared:
    """Check, plan and open the output; nothing is predicted yet."""
    from vesuvius_lab.core.data.volumes import open_volume

    if predictor.blocks is None:
        raise UserError(f"{predictor.run.path}: a {predictor.kind} run that cannot predict a block of a volume "
                        "exactly (its backend predicts whole volumes only). Predict TIFF volumes with it "
                        "(--output FOLDER), or use a run of another kind.")
    source = open_volume(request.input, level=request.level)
    if len(source.shape) != 3:
        raise UserError(f"{request.input}: a {len(source.shape)}D array; a volume to predict is 3D (z, y, x).")
    region = parse_bbox(request.bbox, source.shape) if request.bbox else Box.of_shape(source.shape)
    local_steps, global_steps, halo = chain_parts(predictor, request.probabilities)
    block = tuple(request.block) if request.block else default_block(
        predictor.spec.inference, predictor.spec.inference_window, request.chunk, request.shard)
    _check_block(block, request.chunk, request.shard)
    if request.shard is not None and request.shard % request.chunk:
        raise UserError(f"--shard {request.shard}: a shard holds whole chunks; give a multiple of --chunk "
                        f"{request.chunk}.")
    plan = BlockPlan(tuple(source.shape), region, block)
    if global_steps:  # a global step the pass cannot take is refused now, not after the blocks
        chunked_steps(global_steps, threshold=predictor.chain.threshold, voxels=region.size)
    support = open_support(request, source)
    parts = fingerprint_parts(predictor, request, source, block)
    fingerprint = fingerprint_of(parts)
    output, records = _open_output(request, source, parts, fingerprint, predictor)
    record = records.read_plan() or {}
    if record.get("plan") != plan.to_json():  # the blocks of this command (its --bbox), for --status
        records.write_plan({**record, "plan": plan.to_json()})
    stage = None
    if global_steps and not output.attrs.get("complete"):
        stage = stage_of(request.output, source.shape, output.chunks, output_dtype(local_steps))
    return Prepared(request, predictor, source, plan, halo, support, output, records, fingerprint,
                    local_steps, global_steps, stage)


def _open_output(request: VolumeRequest, source, parts: dict, fingerprint: str, predictor: RunPredictor):
    from vesuvius_lab.core.data.ome_output import OmeZarrOutput

    out = Path(request.output)
    records = BlockRecords(out)
    if out.exists() and request.force:
        _remove_output(out, records)
    if out.exists():
        plan = records.read_plan()
        if plan is None:
            raise UserError(f"{out}: exists and is not an output of `vlab predict` (no readable {records.plan_file.name} "
                            f"under {records.root.name}/). Nothing was changed. Choose another --output, or remove "
                            "it yourself.")
        if plan.get("fingerprint") != fingerprint:
            changed = sorted(k for k in parts if plan.get("parts", {}).get(k) != parts[k])
            raise UserError(f"{out}: holds a prediction made with other settings (different: "
                            f"{', '.join(changed) or 'the fingerprint'}); its {len(records.done_names())} finished "
                            "block(s) are kept. Choose another --output, or add --force to remove it and start over.")
        if not request.resume:
            raise UserError(f"{out}: exists, from the same run and settings, with {len(records.done_names())} finished "
                            "block(s). Add --resume to go on where it stopped (finished blocks are skipped), or "
                            "--force to start over.")
        return OmeZarrOutput.open(out), records
    output = OmeZarrOutput.create(out, shape=source.shape, chunks=(request.chunk,) * 3, zarr_format=request.zarr_format,
                                  shard=(request.shard,) * 3 if request.shard else None, scale=source.scale,
                                  translation=source.translation, attrs=_provenance(predictor, request, parts))
    records.write_plan({"fingerprint": fingerprint, "parts": parts, "created": _now(), "version": __version__})
    return output, records


def _remove_output(out: Path, records: BlockRecords) -> None:
    """--force: remove an earlier output, only if it is one of ours (never a folder the user pointed at by
    mistake)."""
    import shutil

    if records.read_plan() is None:
        raise UserError(f"{out}: --force removes an earlier output of `vlab predict`, but this path is not one "
                        f"(no {records.root.name}/{records.plan_file.name}). Nothing was removed; choose another "
                        "--output.")
    shutil.rmtree(out)


def _provenance(predictor: RunPredictor, request: VolumeRequest, parts: dict) -> dict:
    return {"run": str(predictor.run.path), "experiment": predictor.spec.name, "kind": predictor.kind,
            "checkpoint": request.checkpoint, "run_digest": parts["run_digest"], "output": parts["output"],
            "threshold": parts["threshold"], "chain": parts["chain"], "inference": parts["inference"],
            "input": parts["input"], "support": parts["support"], "spec": predictor.spec.model_dump(mode="json"),
            "values": (
                "probability x 255" if request.probabilities else "mask: 0 background, 255 surface"),
            "version": __version__, "created": _now()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- blocks


def pending_blocks(prepared: Prepared) -> list[Block]:
    """The plan's blocks that no done record covers."""
    return [block for block in prepared.plan.blocks() if prepared.records.done(block) is None]


@contextmanager
def thread_independent() -> Iterator[None]:
    """Convolutions whose results do not depend on the number of CPU threads: oneDNN's do (by up to 5e-7,
    enough to move a voxel across a rounding step of the uint8 output), PyTorch's own do not, so a block
    predicted by one of N workers (1/N of the cores) equals the same block predicted by one process.
    No effect on a GPU; on the CPU, convolutions take about 1.5x longer (``--onednn`` trades the equality
    for the speed)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # setting the flags also sets oneDNN's TF32 switch, which warns without an Intel GPU
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def predict_one(prepared: Prepared, block: Block) -> bool:
    """Predict, write and record one block; False when it held no scroll (nothing predicted)."""
    started = time.monotonic()
    region = block.core.grow(prepared.halo, Box.of_shape(prepared.source.shape))
    support = prepared.support.of(region)  # the chain's halo too: a step such as dilate reaches into the core
    if support is not None and not support.any():
        _write(prepared, block, None)  # drops stale chunks
        prepared.records.mark_done(block, predicted=False, seconds=time.monotonic() - started)
        return False
    with nullcontext() if prepared.request.onednn else thread_independent():
        probabilities = prepared.predictor.blocks(prepared.source, region)
    if support is not None:
        probabilities[~support] = 0
    inner = block.core.relative_to(region)
    if prepared.request.probabilities:
        values = np.rint(probabilities[inner] * 255).astype(np.uint8)
    elif prepared.stage is not None:  # the global pass applies the rest of the chain
        values = np.asarray(apply_local(prepared.local_steps, probabilities))[inner]
    else:
        values = (prepared.predictor.chain.apply(probabilities)[inner] * 255).astype(np.uint8)
    _write(prepared, block, values)
    prepared.records.mark_done(block, predicted=True, seconds=time.monotonic() - started)
    return True


def _write(prepared: Prepared, block: Block, values: np.ndarray | None) -> None:
    """A block's core: to the stage when the global pass comes after, else to the output (None: zeros)."""
    if prepared.stage is not None:
        dtype = prepared.stage.dtype
        prepared.stage[block.core.slices] = np.zeros(block.core.shape, dtype) if values is None else values.astype(dtype, copy=False)
    else:
        prepared.output.write(block.core.slices, np.zeros(block.core.shape, np.uint8) if values is None else values)


def finish(prepared: Prepared, *, progress: bool = True) -> bool:
    """Once every block is done: the global pass (when the chain has global steps), the pyramid (levels
    1-5: max of masks, mean of probabilities) and VC3D's ``meta.json``; the output is then marked complete
    (False: it was complete already, nothing done)."""
    output = prepared.output
    if output.attrs.get("complete"):
        return False
    if prepared.global_steps:
        request = prepared.request
        run_global_pass(request.output, output.level0, output.write_unit, prepared.plan.region, prepared.global_steps,
                        prepared.predictor.chain.threshold, address=request.dask, workers=request.dask_workers,
                        side=request.pass_chunk)
    output.build_pyramid(PYRAMID_LEVELS, reduce="mean" if prepared.request.probabilities else "max",
                         progress=progress)
    scale = prepared.source.scale
    output.write_meta_json(name=Path(prepared.request.output).stem,
                           voxel_size=float(scale[0]) if len(set(scale)) == 1 else None)
    output.update_attrs(complete=True, region=prepared.plan.region.to_json(), finished=_now())
    remove_stage(prepared.request.output)
    return True
