"""The core: everything a plugin plugs into. No model zoo lives here.

One package per stage of the pipeline, lowest first; a stage imports only the stages below it
(an import-linter contract in ``pyproject.toml``, run by the test suite):

- the root, what every stage uses: ``registry`` (the plugin contract), ``errors``, ``files``,
  ``console``, ``interrupts`` (Ctrl-C and SIGTERM), ``children`` (child processes end with their
  parent);
- ``contract``: what model plugins import: ``backend`` (self-training backends), ``models`` (the 2.5D
  wrapper), ``windows`` (the windows a network takes, for plugins' checks);
- ``config``: the spec, experiment loading, project settings, sweeps;
- ``data``: the dataset, volumes of every format, TIFF I/O, folds, synthetic scrolls, patch sampling,
  label damage, ``array_cache`` (checksummed ``.npy`` caches);
- ``metric``: the competition score;
- ``runs``: run folders, their records and ``checkpoint`` (the checkpoint format);
- ``inference``: sliding windows, opening any run, post-processing, ensembles;
- ``training``: the trainer, validation, building ensemble runs;
- ``tuning``: ``vlab tune``, the chain chosen on out-of-fold predictions (beside ``training``);
- ``launch`` and ``reports``: batches of runs; the leaderboard, compare and pictures.
"""

# Imported with the core, so that every multiprocessing child that imports it adopts its parent as it
# starts (a library's pools included): see children.py.
from vesuvius_lab.core import children as _children  # noqa: E402,F401
