"""The global pass: post-processing steps that need the whole volume at once, run chunked on dask.

A chain is cut before its first step whose halo is ``"global"``
(:meth:`vesuvius_lab.core.registry.Plugin.halo_of`). The blocks apply the steps before the cut (their
halos are part of each block's read) and write what those steps give to the *stage*, an array under
``OUT.zarr/.vlab/stage`` of the dtype those steps return (float32 probabilities when there are none).
Once every block is done, :func:`run_global_pass` reads the stage as a dask array and applies the rest:

- a global step through its plugin's ``global_pass`` form (a function of a dask array; connected
  components across chunks from :mod:`vesuvius_lab.core.inference.chunked`);
- a global step without one on the whole array in one task, when the array is at most
  :data:`WHOLE_ARRAY_VOXELS` (refused with a message otherwise);
- a step with a halo through ``map_overlap`` with that halo (the same rule as a block's halo);

then thresholds, and writes the mask (0/255) into level 0 of the output. On a volume that fits in
memory the result equals the in-memory chain's. It runs on a local dask cluster (one single-threaded
worker process per core, each with its share of the memory) or on the scheduler at ``--dask ADDRESS``.
Started again after a kill, it runs again from the stage; the stage is removed once the output is
complete.
"""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from vesuvius_lab.core import children, registry
from vesuvius_lab.core.errors import UserError
from vesuvius_lab.core.inference.blocks import Box
from vesuvius_lab.core.inference.chunked import persist, scratch_space
from vesuvius_lab.core.inference.postprocess import Chain, ChainStep

STAGE = "stage"
#: A global step with no chunked form runs on the whole array in one task: at most this many voxels.
WHOLE_ARRAY_VOXELS = 2 ** 30
#: The default side of the global pass's dask chunks (``--pass-chunk``), rounded to a multiple of the output
#: chunk: what one worker holds at once (its input, labels and result) grows with its cube.
PASS_CHUNK = 256


def step_halo(step: ChainStep) -> int | str:
    return registry.load("postprocessors", step.ref.plugin).halo_of(step.ref.params)


def split_chain(chain: Chain) -> tuple[tuple[ChainStep, ...], tuple[ChainStep, ...]]:
    """(the steps the blocks run, the steps from the first global one on, which the global pass runs)."""
    for index, step in enumerate(chain.steps):
        if step_halo(step) == registry.GLOBAL:
            return chain.steps[:index], chain.steps[index:]
    return chain.steps, ()


def local_halo(steps: tuple[ChainStep, ...]) -> int:
    """Voxels beyond a block's core that ``steps`` (none global) need, one after another."""
    return sum(int(step_halo(step)) for step in steps)


def apply_local(steps: tuple[ChainStep, ...], volume: np.ndarray) -> np.ndarray:
    for step in steps:
        volume = Chain._run(step, volume)
    return volume


def output_dtype(steps: tuple[ChainStep, ...], probe_side: int = 16) -> np.dtype:
    """The dtype ``steps`` return for float32 probabilities (bool is kept as uint8)."""
    if not steps:
        return np.dtype(np.float32)
    side = max(probe_side, 2 * local_halo(steps) + 2)
    dtype = np.asarray(apply_local(steps, np.zeros((side,) * 3, np.float32))).dtype
    return np.dtype(np.uint8) if dtype == np.bool_ else dtype


# --------------------------------------------------------------------------- the stage


def stage_path(output: Path) -> Path:
    from vesuvius_lab.core.inference.block_records import RECORDS

    return Path(output) / RECORDS / STAGE


def create_stage(output: Path, shape, chunks, dtype) -> None:
    """The stage array: ``dtype``, the output's chunks, stored as the output's levels are."""
    import zarr

    from vesuvius_lab.core.data.ome_output import array_options

    zarr.create_array(str(stage_path(output)), shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, zarr_format=2,
                      overwrite=False, **array_options(2))


def stage_of(output: Path, shape, chunks, dtype):
    """The stage of ``output``, created (empty) the first time."""
    if not stage_path(output).is_dir():
        create_stage(output, shape, chunks, dtype)
    return open_stage(output)


def open_stage(output: Path):
    import zarr

    path = stage_path(output)
    if not path.is_dir():
        raise UserError(f"{path}: the blocks' results that the global pass reads are missing (removed by hand?). "
                        f"Start over with --force.")
    return zarr.open_array(str(path), mode="r+").with_config({"write_empty_chunks": False})


def remove_stage(output: Path) -> None:
    shutil.rmtree(stage_path(output), ignore_errors=True)
    shutil.rmtree(stage_path(output).with_name("pass"), ignore_errors=True)


# --------------------------------------------------------------------------- the steps on dask


@dataclass(frozen=True)
class ChunkedStep:
    label: str
    apply: Callable  # dask array -> dask array


def chunked_steps(steps: tuple[ChainStep, ...], *, threshold: float, voxels: int) -> list[ChunkedStep]:
    """Each step as a function of a dask array; refuses a global step that has no chunked form when the
    array is too large to take whole."""
    forms = []
    for step in steps:
        plugin = registry.load("postprocessors", step.ref.plugin)
        halo = plugin.halo_of(step.ref.params)
        if halo != registry.GLOBAL:
            forms.append(ChunkedStep(step.label, _overlapping(step, int(halo))))
        elif plugin.global_pass is not None:
            form = plugin.build_global_pass(step.ref.params, threshold=threshold)
            forms.append(ChunkedStep(step.label, lambda volume, form=form: persist(form(volume))))
        elif voxels <= WHOLE_ARRAY_VOXELS:
            forms.append(ChunkedStep(step.label, _whole(step)))
        else:
            raise UserError(
                f'post-processing step "{step.label}" needs the whole volume and has no chunked form, and this '
                f"volume ({voxels:,} voxels) is more than one task takes ({WHOLE_ARRAY_VOXELS:,}). Predict a "
                "--bbox of at most that size, or drop the step from the chain (see docs/large-volumes.md, "
                "\"The global pass\").")
    return forms


def _probe_dtype(step: ChainStep, dtype, side: int) -> np.dtype:
    result = np.asarray(step.apply(np.zeros((side,) * 3, dtype)))
    return np.dtype(np.uint8) if result.dtype == np.bool_ else result.dtype


def _as_array(function: Callable) -> Callable:
    def run(block: np.ndarray) -> np.ndarray:
        result = np.asarray(function(block))
        return result.astype(np.uint8) if result.dtype == np.bool_ else result
    return run


def _overlapping(step: ChainStep, halo: int) -> Callable:
    def apply(volume):
        dtype = _probe_dtype(step, volume.dtype, max(16, 2 * halo + 2))
        if halo == 0:
            return volume.map_blocks(_as_array(step.apply), dtype=dtype)
        return volume.map_overlap(_as_array(step.apply), depth=halo, boundary="none", dtype=dtype)
    return apply


def _whole(step: ChainStep) -> Callable:
    def apply(volume):
        dtype = _probe_dtype(step, volume.dtype, 16)
        chunks = volume.chunks
        return volume.rechunk(volume.shape).map_blocks(_as_array(step.apply), dtype=dtype).rechunk(chunks)
    return apply


# --------------------------------------------------------------------------- the pass


def pass_chunks(region: Box, unit: tuple[int, int, int], side: int = PASS_CHUNK) -> tuple[tuple[int, ...], ...]:
    """Dask chunks over ``region`` whose edges lie on the output's chunk grid (``unit``), so that no two
    tasks write one chunk of the output."""
    chunks = []
    for start, stop, step in zip(region.start, region.stop, unit):
        size = max(step, side // step * step)
        edges = [start] + list(range((start // size + 1) * size, stop, size)) + [stop]
        chunks.append(tuple(b - a for a, b in zip(edges, edges[1:]) if b > a))
    return tuple(chunks)


def pass_result(stage, region: Box, steps: tuple[ChainStep, ...], threshold: float, unit, side: int = PASS_CHUNK):
    """The lazy uint8 mask (0/255) of ``steps`` and the threshold over ``region`` of the stage, in dask
    chunks of ``side`` (rounded to the output's chunks)."""
    import dask.array as da

    from vesuvius_lab.core.inference.chunked import to_mask

    volume = da.from_zarr(stage)[region.slices].rechunk(tuple(max(u, side // u * u) for u in unit))
    for form in chunked_steps(steps, threshold=threshold, voxels=region.size):
        volume = form.apply(volume)
    return (to_mask(volume, threshold) * np.uint8(255)).rechunk(pass_chunks(region, unit))


def run_global_pass(output_path: Path, array, unit, region: Box, steps: tuple[ChainStep, ...], threshold: float, *,
                    address: str | None = None, workers: int | None = None, side: int = PASS_CHUNK) -> dict[str, float]:
    """Apply ``steps`` (from the first global one) to the stage over ``region`` and write the mask into
    ``array`` (the output's level 0, written in whole ``unit``s: chunks, or shards), on a dask cluster.
    Returns each worker's peak resident memory in MiB."""
    import dask.array as da

    stage = open_stage(output_path)
    scratch = stage_path(output_path).with_name("pass")
    shutil.rmtree(scratch, ignore_errors=True)  # what a killed pass left
    with dask_client(address, workers) as client, scratch_space(scratch):
        result = pass_result(stage, region, steps, threshold, tuple(unit), side)
        da.store(result, array, regions=region.slices, lock=False)
        peaks = client.run(_peak_mib)
    shutil.rmtree(scratch, ignore_errors=True)
    return peaks


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def dask_client(address: str | None = None, workers: int | None = None) -> Iterator[object]:
    """A dask client: of the scheduler at ``address``, or of a local cluster of ``workers`` single-threaded
    processes (default: one per usable core) that share this machine's memory. distributed sets thread
    and allocator variables (OMP_NUM_THREADS=1, ...) in this process's environment for its workers; they
    are put back afterwards, so that nothing started later inherits them."""
    environment = dict(os.environ)
    try:
        with _client(address, workers) as client:
            yield client
    finally:
        for name in set(os.environ) - set(environment):
            del os.environ[name]
        os.environ.update({name: value for name, value in environment.items() if os.environ.get(name) != value})


@contextmanager
def _client(address: str | None, workers: int | None) -> Iterator[object]:
    from distributed import Client, LocalCluster

    if address:
        try:
            _refuses(address)
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise UserError(f"--dask {address}: no dask scheduler answers there ({exc}). Start one (`dask "
                            "scheduler`, or a dask-jobqueue cluster) and give its address, or leave --dask out to "
                            "use a local cluster.") from None
        with client:
            yield client
        return
    cores = len(children.usable_cpus())
    with LocalCluster(n_workers=max(1, workers or cores), threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit="auto") as cluster, Client(cluster) as client:
        yield client


def _refuses(address: str) -> None:
    """Raise ConnectionRefusedError at once where nothing listens on a tcp:// address; the client would retry
    a refused connection for its whole timeout. Other schemes and unreachable hosts are left to the client."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        return
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except ConnectionRefusedError:
        raise
    except OSError:
        return
