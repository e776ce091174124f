"""Inference: from a volume to a mask.

The sliding-window engine (window placement, batching, blending, TTA, 2.5D axes), opening any
run to predict with it through one table of run kinds (models, self-training backends,
ensembles), predicting folders and writing the submission zip, the post-processing chain, the
merge of stitched voxels, ensembles of runs and the probability cache they read.

May import: the root of core, ``contract``, ``config``, ``data``, ``metric`` and ``runs``.
"""

from vesuvius_lab.core.inference.engine import predict_volume, sliding_window
from vesuvius_lab.core.inference.run_kinds import RunPredictor, load_run

__all__ = ["RunPredictor", "load_run", "predict_volume", "sliding_window"]
