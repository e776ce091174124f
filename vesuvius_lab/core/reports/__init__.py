"""Reports: what the runs say, for people.

The leaderboard (rows per experiment, folds aggregated, filters, sorting, exports to Markdown,
CSV, JSON and HTML), ``vlab compare``, the score tables of ``vlab evaluate``, pictures of volumes
and training curves, and the HTML run report.

May import: every stage up to ``training``. Nothing imports it but the command line.
"""
