"""The nnU-Net v2 backend: a model plugin that plans, preprocesses, trains and predicts with nnU-Net.

Registered as the ``nnunet`` entry point of ``vesuvius_lab.models``. nnU-Net owns its loss
(Dice + cross-entropy with the ignore label), optimiser (SGD, poly schedule), patch sampling
and augmentation, so an experiment's ``[[loss]]`` tables and ``[train]`` optimiser keys do not
apply; ``[train] epochs``, ``iterations_per_epoch``, ``nproc``, ``seed`` and ``workers`` do. Its
predictions come back as surface probabilities and go through the same post-processing, metric
and leaderboard as every other model. Importing this module stays cheap: nnU-Net, torch and
the model code load only when the factory runs.

nnU-Net starts process pools with spawn, which re-imports the main module: a script that trains
through this backend needs the ``if __name__ == "__main__":`` guard (``vlab`` has it).
"""

from __future__ import annotations

from typing import Any

from vesuvius_lab.core.registry import plugin
from vesuvius_lab.plugins.nnunet.checks import check_params
from vesuvius_lab.plugins.nnunet.params import NnUNetParams


@plugin(NnUNetParams, check=check_params)
def nnunet(params: NnUNetParams, *, inference: Any = None, **context: Any):
    """nnU-Net v2 (ResEnc M/L/XL or default planner) trained and applied through its Python API."""
    from vesuvius_lab.plugins.nnunet.model import NnUNetModel

    return NnUNetModel(params, inference)
