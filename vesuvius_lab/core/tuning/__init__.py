"""Tuning: the post-processing chain and threshold chosen on out-of-fold predictions, against the exact score.

``vlab tune FILE`` reads the ``[tune]`` search space of an experiment file, gathers the
out-of-fold probabilities of its trained fold runs (or of its built ensemble run), and lets Optuna
(TPE) search the chain's parameters; every trial re-runs only the post-processing on cached
probabilities and scores the volumes with the competition metric, with the label-only parts of
the score computed once per volume. Besides the in-sample best it records an honest estimate
(tuned on all groups of volumes but one, scored on the one left out), writes the tuned experiment
file and a run that the leaderboard ranks as its own row, marked ``tuned``.

May import: the root of core, ``contract``, ``config``, ``data``, ``metric``, ``runs`` and ``inference``.
"""
