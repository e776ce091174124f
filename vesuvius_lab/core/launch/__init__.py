"""Launching: many runs from many experiment files.

``vlab run``: experiment files and their sweeps and folds planned into jobs, finished runs
skipped, killed ones resumed, each job trained or built in turn.

May import: every stage up to ``training``. Nothing imports it but the command line.
"""
