"""Training: from an experiment file to a scored run.

The trainer (patches, losses, AMP, DDP, checkpoints, resume), the weighted loss objective, the
distributed helpers, validation by the competition score after every post-processing step (it
predicts with the inference engine), the run summary, and building ensemble runs, which turn an
``[ensemble]`` experiment into a scored run the same way.

May import: every stage below it: the root of core, ``contract``, ``config``, ``data``, ``metric``, ``runs``,
``inference``.
"""
