"""Reports over finished (or running) run dirs: what `ttrl-compare` writes.

- runs.py          reading run dirs and sweep dirs, labelling runs by what
                   differs, small statistics shared by every report
- side_by_side.py  the default table: final and best metrics per run, and
                   the same over seeds (comparison.md / .json)
- grid.py          `--grid`: the demo grid's before/after table and its bar
- arms.py          `--arms`: one line per arm, with the spread across seeds
- plots.py         every figure the reports draw (matplotlib, Agg backend)

The command line is ttrl/compare.py, an entry module above this package;
nothing here imports it. Modules here only read run dirs: they never start,
resume or modify a run. This file imports nothing, so that importing one
report does not pull in the others.
"""
