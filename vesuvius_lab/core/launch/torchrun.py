"""The ``torchrun`` of one node of a multi-node SLURM job, built from SLURM's environment.

The recipe of PyTorch's documentation for SLURM: ``srun`` starts one task per node, and each task runs
``torchrun --nnodes N --nproc-per-node G`` with a rendezvous on the first host of the allocation.
The rendezvous is static (``--node-rank`` from ``SLURM_NODEID``, ``--master-addr``), so rank 0, which
writes the run, is on the first node.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from vesuvius_lab.core.errors import UserError


def first_host(node_list: str) -> str:
    """The first host of a SLURM node list such as ``gpu[03-05,09],cpu1``."""
    from submitit.slurm.slurm import _parse_node_list

    hosts = _parse_node_list(node_list)
    if not hosts:
        raise UserError(f"SLURM_JOB_NODELIST {node_list!r} names no host.")
    return hosts[0]


def torchrun_command(env: Mapping[str, str], nproc_per_node: int, port: int, payload: Path, result: Path) -> list[str]:
    """This node's ``torchrun`` of a multi-node job, from SLURM's environment: ``SLURM_NNODES`` nodes,
    this one ``SLURM_NODEID``, the rendezvous (static, so rank 0 is on the first node) on the first host
    of ``SLURM_JOB_NODELIST``. As in PyTorch's SLURM recipe, but one task per node started by srun."""
    missing = [key for key in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST") if key not in env]
    if missing:
        raise UserError(f"a multi-node job needs SLURM's environment; {', '.join(missing)} not set "
                        "(run it through --launcher slurm).")
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={env['SLURM_NNODES']}", f"--node-rank={env['SLURM_NODEID']}",
            f"--nproc-per-node={nproc_per_node}",
            f"--master-addr={first_host(env['SLURM_JOB_NODELIST'])}", f"--master-port={port}",
            "-m", "vesuvius_lab.core.launch.worker", str(payload), str(result)]
