"""Runs: the folder every training, ensemble and (later) tuning writes, and reading it back.

A run folder (``runs/<experiment>/<run-id>/``: spec, environment, status, metrics, scores,
summary, checkpoints, log), written atomically; its state (running, finished, killed, ...);
finding runs and reading their records for the stages above.

May import: the root of core, ``contract``, ``config``, ``data`` and ``metric``. It sits below inference and
training because both write or read run folders; starting runs in batches is ``launch``.
"""
