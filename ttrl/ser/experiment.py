"""Does SER recover the labels it does not have? Seed-only vs SER vs all labels.

    python -m ttrl.ser.experiment --out outputs/ser_experiment --seeds 0 1 2 [hydra overrides]

For every seed, on the same data and with the same reward-model recipe (the
SER stage of experiment=ser_synthetic unless the overrides say otherwise):
  (a) seed only:  an RM trained on ser.seed_fraction of the labelled pairs
                  (round 0 of the SER run below: the same model, not a rerun)
  (b) SER:        self-labelling rounds started from that seed RM; the round
                  kept is the best on the held-out pairs
  (c) all labels: an RM trained on 100% of the labelled pairs, no rounds
Accuracy on separate test pairs (ser.synthetic_num_test; held-out pairs only
pick SER's round), one table (markdown, also JSON) in --out. Each run is a
real SER stage: Ray, DeepSpeed reward-model ranks, metrics.jsonl per run dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ttrl.cli import compose  # noqa: F401  (this module's callers compose through it)

DEFAULTS = ["experiment=ser_synthetic", "logger.progress=false", "ser.synthetic_num_test=1000"]


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| seed | (a) seed only | (b) SER | (c) all labels | SER best round / rounds | pairs kept "
             "(self-label acc) | SER stop |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seed']} | {r['a']:.3f} | {r['b']:.3f} | {r['c']:.3f} | {r['best_round']} / "
                     f"{r['rounds']} | {r['kept']} of {r['pool']} ({r['self_label_accuracy']:.3f}) | {r['stop']} |")
    lines.append(f"| mean ± sd | {_mean_sd([r['a'] for r in results])} | {_mean_sd([r['b'] for r in results])} | "
                 f"{_mean_sd([r['c'] for r in results])} | | | |")
    lines += ["", "Per round: self-labels kept (status 1 + status 2), how many of them were right, and the "
              "retrained RM's test accuracy.", "", "| seed | round | kept | right | test accuracy |",
              "|---|---|---|---|---|"]
    for r in results:
        for x in r.get("per_round", [])[1:]:
            kept = int(x.get("ser/kept_status1", 0) + x.get("ser/kept_status2", 0))
            acc = x.get("ser/self_label_accuracy")
            right = f"{round(acc * kept)} ({acc:.3f})" if kept and acc == acc and acc is not None else "–"
            test = x.get("ser/test_accuracy", x.get("ser/rm_accuracy"))
            lines.append(f"| {r['seed']} | {int(x['ser/round'])} | {kept} | {right} | "
                         f"{'–' if test is None else f'{test:.3f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/ser_experiment")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reuse-all", default=None, metavar="DIR",
                    help="take (c) from DIR/results.json (same seeds, same recipe) instead of retraining it")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. ser.rm.lr=1e-4)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from ttrl.distributed.ray_setup import Needs, start_ray, stop_ray
    from ttrl.ser.loop import run_ser

    base = compose(DEFAULTS + args.overrides)
    owns = start_ray(base.cluster.address, "cpu" if base.device in ("cpu", "auto") else base.device,
                     Needs(cpus=base.ser.rm.num_workers, gpus=0), base.cluster.num_cpus, base.cluster.num_gpus)
    # Runs of other seeds already in --out stay in the table (one seed per call is fine).
    old = out / "results.json"
    results = [r for r in (json.loads(old.read_text()) if old.exists() else []) if r["seed"] not in args.seeds]
    t0 = time.perf_counter()
    try:
        for seed in args.seeds:
            cfg_b = compose(DEFAULTS + args.overrides + [f"seed={seed}"])
            res_b = run_ser(cfg_b, out / f"seed{seed}_ser")
            reused = None
            if args.reuse_all:
                prev = json.loads((Path(args.reuse_all) / "results.json").read_text())
                reused = next((x for x in prev if x["seed"] == seed), None)
            if reused is None:
                cfg_c = compose(DEFAULTS + args.overrides + [f"seed={seed}", "ser.seed_fraction=1.0",
                                                              "ser.max_rounds=0"])
                res_c = run_ser(cfg_c, out / f"seed{seed}_all")
            rows = res_b.rows
            key = "ser/test_accuracy" if "ser/test_accuracy" in rows[0] else "ser/rm_accuracy"
            trained = [r for r in rows if key in r]
            best = next(r for r in trained if r["ser/round"] == res_b.best_round)
            last = rows[-1]
            r = {"seed": seed, "metric": key, "a": rows[0][key], "b": best[key], "b_last": trained[-1][key],
                 "c": reused["c"] if reused else res_c.rows[0][key], "a_held": rows[0]["ser/rm_accuracy"],
                 "b_held": res_b.best_accuracy, "c_held": reused["c_held"] if reused else res_c.best_accuracy, "rounds": len(rows) - 1, "best_round": res_b.best_round,
                 "kept": int(last.get("ser/kept_total", 0)), "pool": int(rows[0]["ser/pool_left"]),
                 "self_label_accuracy": last.get("ser/self_label_accuracy_total", float("nan")),
                 "stop": res_b.stop, "per_round": [{k: v for k, v in x.items() if k.startswith("ser/")} for x in rows]}
            results = sorted(results + [r], key=lambda x: x["seed"])
            print(f"seed {seed}: (a) {r['a']:.3f}  (b) {r['b']:.3f}  (c) {r['c']:.3f}  "
                  f"[{time.perf_counter() - t0:.0f}s]", file=sys.stderr, flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    finally:
        stop_ray(owns)
    md = table(results)
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"total {time.perf_counter() - t0:.0f}s; {out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
