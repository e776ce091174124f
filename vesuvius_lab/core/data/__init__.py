"""Data: the volumes and how training sees them.

The dataset index (``train.csv``, image and label folders) and its checks, TIFF reading and
writing with the decoded-volume cache, folds grouped by scroll, synthetic scroll volumes in the
competition layout, patch sampling and augmentation, and the label damage of the hole-stitching
task.

May import: the root of core, ``contract`` and ``config``.
"""
