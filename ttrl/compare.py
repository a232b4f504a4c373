"""`ttrl-compare RUN_DIR... [--out DIR] [--grid | --arms | --collapse-step]`: the command line of the reports.

An entry module, like ttrl/train.py: it parses the command line, calls one
report of ttrl/report/ (side by side by default, `--grid` for the demo
grid, `--arms` per arm with the seed spread, `--collapse-step` for how many
steps each run's votes held) and prints its table. Bad run
dirs end in one line on stderr and exit code 2, never a traceback. No
library module imports this one; the reports themselves live in
ttrl/report/ and never modify a run dir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ttrl.report.runs import CompareError, pull_wandb_group


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ttrl-compare",
                                 description="`ttrl-compare RUN_DIR... [--out DIR]`: runs side by side, "
                                             "from their run dirs alone.")
    ap.add_argument("runs", nargs="*", type=Path,
                    help="run dirs (each with config.yaml and metrics.jsonl) or sweep dirs (holding run dirs)")
    ap.add_argument("--out", type=Path, default=Path("outputs/compare"), help="where to write the table and plots")
    ap.add_argument("--wandb", metavar="GROUP", help="also compare the runs of this W&B group (needs network)")
    ap.add_argument("--project", default="ttrl")
    ap.add_argument("--entity", default=None)
    ap.add_argument("--grid", action="store_true",
                    help="the demo grid's before/after table (grid.md, grid.json, grid.png) instead")
    ap.add_argument("--replay-guard", action="store_true",
                    help="with --grid: the guard's verdict replayed on each run's votes.jsonl with today's "
                         "default limits, instead of the verdict the run logged")
    ap.add_argument("--arms", action="store_true",
                    help="one line and one pass@1 curve per arm (logger.wandb.job_type, else algorithm/reward), "
                         "with the spread across seeds (arms.md, arms.json, arms.png) instead")
    ap.add_argument("--collapse-step", action="store_true",
                    help="the model-collapse step of each run: the first step the guard's consensus signals fire, "
                         "replayed from its votes (collapse.md, collapse.json) instead")
    ap.add_argument("--against", nargs="+", type=Path, metavar="RUN",
                    help="with --collapse-step: full runs (e.g. TTRL) whose pass@1 gain each warm start's "
                         "collapse step is ranked against (Spearman)")
    ap.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                    help="with --collapse-step or --arms: a safety limit for the replayed collapse step, over "
                         "each run's own (e.g. max_excess_drift=0.15, max_first_vote_drift=null); repeatable")
    args = ap.parse_args(argv)
    try:
        runs = list(args.runs)
        if args.wandb:
            runs += pull_wandb_group(args.wandb, args.project, args.entity, args.out / "wandb_runs")
        if not runs:
            ap.error("give at least one run dir (or --wandb GROUP)")
        if args.grid:
            from ttrl.report.grid import grid_report

            md = grid_report(runs, args.out, replay_guard=args.replay_guard)
            print(md.read_text())
            print(f"ttrl-compare: wrote {md}, grid.json and grid.png in {args.out}", file=sys.stderr)
            return
        if args.against and not args.collapse_step:
            ap.error("--against goes with --collapse-step")
        if args.limit and not (args.collapse_step or args.arms):
            ap.error("--limit goes with --collapse-step or --arms")
        limits = _limits(args.limit)
        if args.collapse_step:
            from ttrl.report.collapse import collapse_report

            md = collapse_report(runs, args.out, against=args.against, limits=limits)
            print(md.read_text())
            print(f"ttrl-compare: wrote {md} and collapse.json in {args.out}", file=sys.stderr)
            return
        if args.arms:
            from ttrl.report.arms import arms_report

            md = arms_report(runs, args.out, limits=limits)
            print(md.read_text())
            print(f"ttrl-compare: wrote {md}, arms.json and arms.png in {args.out}", file=sys.stderr)
            return
        from ttrl.report.side_by_side import compare

        md, pngs = compare(runs, args.out)
    except CompareError as err:
        print(f"ttrl-compare: {err}", file=sys.stderr)
        sys.exit(2)
    print(md.read_text())
    print(f"ttrl-compare: wrote {md}, comparison.json and {len(pngs)} plots in {args.out}", file=sys.stderr)


def _limits(given: list[str]) -> dict[str, Any]:
    """--limit KEY=VALUE arguments as a dict of checked safety limits."""
    from ttrl.metrics.replay import parse_limits

    try:
        return parse_limits(given)
    except ValueError as err:
        raise CompareError(f"--limit {err}") from None


if __name__ == "__main__":
    main()
