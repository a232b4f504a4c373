"""The SER rounds: a reward model that labels its own training data.

    round 0   train the seed RM on ser.seed_fraction of the labelled pairs
    round t   score both responses of every unlabelled pair, p = sigmoid(score)
              keep the pairs the RM is sure of (ttrl/ser/filter.py: status 1,
              then status 2), labelled as the RM says; the rest wait
              retrain on seed + everything kept so far; held-out accuracy
    stop      no new pair kept | no held-out improvement for ser.patience
              rounds | ser.max_rounds
    save      the best RM by held-out accuracy -> <run dir>/ser/final_rm

The pointwise variant does the same with single (problem, response) items
labelled correct/incorrect: the seed is ser.seed_fraction of the *problems*,
whose responses are graded against their ground truth; the RM labels the
responses of the other problems (p > high: correct, p < low: incorrect).

The truth of the unlabelled data is hidden from everything but the metrics
(`ser/self_label_accuracy`); held-out pairs are labelled, never trained on,
and only pick the best round. One metrics row per round goes to the run
dir's metrics.jsonl (step = round) and to ser/metrics.jsonl (with a
synthetic test split, `ser/test_accuracy` too: the best round is picked on
held-out pairs, so its held-out accuracy is optimistic, its test accuracy not); each round's
score table (p of both responses, the decision, the hidden truth) goes to
ser/scores_round<k>.jsonl for analysis.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttrl.data.preferences import (
    PointItem,
    PreferencePair,
    UnorderedPair,
    load_point_file,
    load_preferences,
    synthetic_points,
    unordered,
)
from ttrl.ser.filter import judge_pairs, judge_points, sigmoid, stop_reason, summarize_pairs, summarize_points

__all__ = ["SERResult", "run_ser", "ser_round_loop"]


@dataclass
class SERResult:
    final_rm: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    stop: str = ""
    best_round: int = 0
    best_accuracy: float = float("nan")


class _Log:
    """metrics.jsonl of the run dir and of ser/, plus a progress line."""

    def __init__(self, run_dir: Path, quiet: bool):
        from ttrl.metrics.logger import JsonlLogger

        self.sinks = [JsonlLogger(run_dir / "metrics.jsonl"), JsonlLogger(run_dir / "ser" / "metrics.jsonl")]
        self.quiet = quiet

    def __call__(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(row)
        if not self.quiet:
            keys = [("ser/rm_accuracy", "held-out acc {:.3f}"), ("ser/kept_status1", "kept s1 {:.0f}"),
                    ("ser/kept_status2", "s2 {:.0f}"), ("ser/self_label_accuracy", "self-label acc {:.3f}"),
                    ("ser/train_rows", "train {:.0f}"), ("ser/pool_left", "pool {:.0f}"),
                    ("ser/round_seconds", "{:.0f}s")]
            parts = [f"ser round {row['ser/round']}"] + [f.format(row[k]) for k, f in keys
                                                         if row.get(k) is not None and row[k] == row[k]]
            print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


# ── the two variants, behind one interface ────────────────────────────────
class _Pairwise:
    """Preference pairs: seed pairs, an unordered pool, pairwise held-out accuracy."""

    def __init__(self, train: list[PreferencePair], held: list[PreferencePair], seed_fraction: float, seed: int,
                 test: list[PreferencePair] | None = None):
        rng = random.Random(seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_seed = max(1, round(seed_fraction * len(train)))
        self.seed_rows = [train[i] for i in sorted(order[:n_seed])]
        self.pool: list[UnorderedPair] = unordered([train[i] for i in sorted(order[n_seed:])], seed)
        self.held, self.test = held, test or []
        self.kept: list[PreferencePair] = []

    @staticmethod
    def _accuracy(rm: Any, pairs: list[PreferencePair]) -> tuple[float, float]:
        n = len(pairs)
        s = rm.score([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        c, r = s[:n], s[n:]
        return sum(x > y for x, y in zip(c, r)) / max(n, 1), sum(x - y for x, y in zip(c, r)) / max(n, 1)

    def evaluate(self, rm: Any) -> dict[str, float]:
        acc, margin = self._accuracy(rm, self.held)
        out = {"ser/rm_accuracy": acc, "ser/held_margin": margin}
        if self.test:
            out["ser/test_accuracy"] = self._accuracy(rm, self.test)[0]
        return out

    def self_label(self, rm: Any, rule: dict) -> tuple[dict[str, float], int]:
        if not self.pool:
            return {"ser/kept_status1": 0.0, "ser/kept_status2": 0.0, "ser/self_label_accuracy": float("nan")}, 0
        n = len(self.pool)
        s = rm.score([p.prompt for p in self.pool] * 2, [p.a for p in self.pool] + [p.b for p in self.pool])
        p_a, p_b = [sigmoid(x) for x in s[:n]], [sigmoid(x) for x in s[n:]]
        decisions = judge_pairs(p_a, p_b, **rule)
        stats = summarize_pairs(decisions, [p.a_better for p in self.pool])
        self.last_table = [{"id": pair.id, "p_a": a, "p_b": b, "status": d.status, "self_a_better": d.a_better,
                            "true_a_better": pair.a_better}
                           for pair, a, b, d in zip(self.pool, p_a, p_b, decisions)]
        new = [pair.as_labelled(bool(d.a_better)) for pair, d in zip(self.pool, decisions) if d.keep]
        self.pool = [pair for pair, d in zip(self.pool, decisions) if not d.keep]
        self._total_correct = getattr(self, "_total_correct", 0.0) + stats["self_label_correct"]
        self.kept += new
        return {"ser/kept_status1": stats["kept_status1"], "ser/kept_status2": stats["kept_status2"],
                "ser/self_label_accuracy": stats["self_label_accuracy"],
                "ser/self_label_accuracy_total": self._total_correct / max(len(self.kept), 1),
                "ser/p_mean": sum(p_a + p_b) / (2 * n)}, len(new)

    def train_rows(self) -> list[PreferencePair]:
        return self.seed_rows + self.kept


class _Pointwise:
    """Graded responses: seed problems graded against the truth, the rest self-labelled."""

    def __init__(self, items: list[PointItem], held: list[PointItem], seed_fraction: float, seed: int):
        problems = sorted({it.prompt for it in items})
        rng = random.Random(seed)
        rng.shuffle(problems)
        seeded = set(problems[: max(1, round(seed_fraction * len(problems)))])
        # The seed problems' responses are graded against their ground truth (PointItem.correct).
        self.seed_rows = [it for it in items if it.prompt in seeded]
        if any(it.correct is None for it in self.seed_rows):
            raise ValueError("pointwise SER: a seed response has no grade (its problem needs a ground-truth answer)")
        # The pool's grades stay on the items for metrics; training sees only self-labels.
        self.pool = [it for it in items if it.prompt not in seeded]
        self.held = held
        self.kept: list[PointItem] = []

    def evaluate(self, rm: Any) -> dict[str, float]:
        s = rm.score([it.prompt for it in self.held], [it.response for it in self.held])
        acc = sum((x > 0) == bool(it.correct) for x, it in zip(s, self.held)) / max(len(self.held), 1)
        # Pairwise view of the same model: a right answer outscoring a wrong one of the same problem.
        by_prob: dict[str, list[tuple[float, bool]]] = {}
        for x, it in zip(s, self.held):
            by_prob.setdefault(it.prompt, []).append((x, bool(it.correct)))
        wins = [xr > xw for g in by_prob.values() for xr, cr in g if cr for xw, cw in g if not cw]
        return {"ser/rm_accuracy": acc, "ser/rm_pair_accuracy": sum(wins) / len(wins) if wins else float("nan")}

    def self_label(self, rm: Any, rule: dict) -> tuple[dict[str, float], int]:
        if not self.pool:
            return {"ser/kept_status1": 0.0, "ser/kept_status2": 0.0, "ser/self_label_accuracy": float("nan")}, 0
        s = rm.score([it.prompt for it in self.pool], [it.response for it in self.pool])
        ps = [sigmoid(x) for x in s]
        decisions = judge_points(ps, rule["high"], rule["low"])
        stats = summarize_points(decisions, [it.correct for it in self.pool])
        self.last_table = [{"id": it.id, "p": p, "status": d.status, "self_correct": d.correct,
                            "true_correct": it.correct} for it, p, d in zip(self.pool, ps, decisions)]
        new = [PointItem(it.id, it.prompt, it.response, None, d.correct)  # the self-label, no ground truth
               for it, d in zip(self.pool, decisions) if d.keep]
        self.pool = [it for it, d in zip(self.pool, decisions) if not d.keep]
        self._total_correct = getattr(self, "_total_correct", 0.0) + stats["self_label_correct"]
        self.kept += new
        return {"ser/kept_status1": stats["kept_status1"], "ser/kept_status2": 0.0,
                "ser/kept_positive": stats["kept_positive"],
                "ser/self_label_accuracy": stats["self_label_accuracy"],
                "ser/self_label_accuracy_total": self._total_correct / max(len(self.kept), 1)}, len(new)

    def train_rows(self) -> list[PointItem]:
        return self.seed_rows + self.kept


def build_task(cfg: Any) -> _Pairwise | _Pointwise:
    s = cfg.ser
    if s.mode == "pointwise":
        if s.source == "jsonl":
            items = load_point_file(s.local_path, prompt_key=s.prompt_key or "problem",
                                    response_key=s.response_key, answer_key=s.answer_key)
            held = (load_point_file(s.eval_path, prompt_key=s.prompt_key or "problem", response_key=s.response_key,
                                    answer_key=s.answer_key) if s.eval_path else None)
            if held is None:  # held-out *problems*, all their responses
                problems = sorted({it.prompt for it in items})
                random.Random(cfg.seed).shuffle(problems)
                out = set(problems[: max(1, round(s.eval_fraction * len(problems)))])
                held = [it for it in items if it.prompt in out]
                items = [it for it in items if it.prompt not in out]
            return _Pointwise(items, held, s.seed_fraction, cfg.seed)
        items = synthetic_points(s.synthetic_num_pairs + s.synthetic_num_eval, s.synthetic_per_problem,
                                 s.synthetic_terms, s.synthetic_digits, s.synthetic_seed,
                                 style=s.synthetic_style)
        cut = s.synthetic_num_pairs * s.synthetic_per_problem
        return _Pointwise(items[:cut], items[cut:], s.seed_fraction, cfg.seed)
    train, held, test = load_preferences(s, seed=cfg.seed)
    return _Pairwise(train, held, s.seed_fraction, cfg.seed, test)


# ── the rounds ────────────────────────────────────────────────────────────
def _write_table(path: Path, table: list[dict[str, Any]]) -> None:
    """The round's score table (the filter's input and output, with the hidden truth, for analysis)."""
    with path.open("w") as fh:
        for row in table:
            fh.write(json.dumps(row) + "\n")


def ser_round_loop(cfg: Any, rm: Any, task: _Pairwise | _Pointwise, out_dir: Path, log: Any,
                   max_rounds: int | None = None) -> SERResult:
    """Seed RM, then self-labelling rounds until a stop rule fires; saves the best RM.

    `rm` needs fit(rows, seed), score(prompts, responses), reset(), save(path, **meta).
    """
    s = cfg.ser
    max_rounds = s.max_rounds if max_rounds is None else max_rounds
    rule = {"high": s.high, "low": s.low, "min_gap": s.min_gap, "use_status2": s.use_status2}
    final = out_dir / "final_rm"
    accs: list[float] = []
    rows: list[dict[str, Any]] = []
    best_round, stop = 0, f"ser.max_rounds={max_rounds} reached"

    def train_and_eval(round_no: int, extra: dict[str, float]) -> dict[str, Any]:
        nonlocal best_round
        if round_no > 0 and s.reinit_each_round:
            rm.reset()
        train = task.train_rows()
        fit = rm.fit(train, seed=cfg.seed * 1000 + round_no)
        ev = task.evaluate(rm)
        acc = ev["ser/rm_accuracy"]
        improved = not accs or acc > max(accs)
        accs.append(acc)
        row = {"step": round_no, "ser/round": round_no, **extra, **ev,
               "ser/train_rows": float(len(train)), "ser/seed_rows": float(len(task.seed_rows)),
               "ser/kept_total": float(len(task.kept)), "ser/pool_left": float(len(task.pool)),
               "ser/train_loss": fit.loss, "ser/train_accuracy": fit.accuracy, "ser/train_steps": float(fit.steps),
               "ser/fit_seconds": fit.seconds, "ser/best_round": float(round_no if improved else best_round)}
        if improved:
            best_round = round_no
            # The test accuracy rides along (it never picks the round): reports of the
            # policies this RM rewards read it from ttrl_rm.json (ttrl.report.arms).
            rm.save(final, ser_round=round_no, held_out_accuracy=acc,
                    **({"test_accuracy": ev["ser/test_accuracy"]} if "ser/test_accuracy" in ev else {}))
        return row

    t = time.perf_counter()
    row = train_and_eval(0, {"ser/kept_status1": 0.0, "ser/kept_status2": 0.0})
    row["ser/round_seconds"] = time.perf_counter() - t
    log(row)
    rows.append(row)
    for round_no in range(1, max_rounds + 1):
        t = time.perf_counter()
        t_score = time.perf_counter()
        stats, n_new = task.self_label(rm, rule)
        stats["ser/score_seconds"] = time.perf_counter() - t_score
        _write_table(out_dir / f"scores_round{round_no}.jsonl", getattr(task, "last_table", []))
        if n_new:
            row = train_and_eval(round_no, stats)
        else:
            row = {"step": round_no, "ser/round": round_no, **stats, "ser/kept_total": float(len(task.kept)),
                   "ser/pool_left": float(len(task.pool))}
        row["ser/round_seconds"] = time.perf_counter() - t
        reason = stop_reason(round_no, n_new, accs, max_rounds, s.patience)
        if reason:
            row["ser/stop"] = reason
        log(row)
        rows.append(row)
        if reason:
            stop = reason
            break
    else:
        if max_rounds == 0:
            stop = "ser.max_rounds=0: the seed RM only"
    meta = {"stop": stop, "best_round": best_round, "best_accuracy": accs[best_round] if accs else None,
            "rounds": rows}
    (out_dir / "summary.json").write_text(json.dumps(meta, indent=1, default=float))
    return SERResult(final, rows, stop, best_round, accs[best_round] if accs else float("nan"))


def _rm_backbone(cfg: Any) -> Any:
    """The model section the RM's backbone is built from: the policy's, or with ser.rm.warmstart_steps
    the same tiny-arith warm-start recipe run for that many steps (and no more: the judge is weak on
    purpose, so the build's check that it reached its teacher is off)."""
    steps = cfg.ser.rm.warmstart_steps
    if steps is None:
        return cfg.model
    from omegaconf import OmegaConf

    model = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    model.warmstart.steps = int(steps)
    model.warmstart.target_maj = None
    return model


def run_ser(cfg: Any, run_dir: Path, quiet: bool | None = None) -> SERResult:
    """The SER stage on Ray + DeepSpeed: data, RM workers, rounds; Ray is stopped after if we started it."""
    import torch
    from transformers import AutoTokenizer

    from ttrl.distributed.device import resolve_device, resolve_dtype
    from ttrl.distributed.ray_setup import Needs, start_ray, stop_ray
    from ttrl.models import resolve_model_path
    from ttrl.trainer.reward_model import RewardModelTrainer

    s = cfg.ser
    quiet = (not cfg.logger.progress) if quiet is None else quiet
    out_dir = Path(run_dir) / "ser"
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    model_path = s.rm.path or resolve_model_path(_rm_backbone(cfg), cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.trainer.dtype, device)
    W = s.rm.num_workers
    owns = start_ray(cfg.cluster.address, device, Needs(cpus=W, gpus=W if device == "cuda" else 0),
                     cfg.cluster.num_cpus, cfg.cluster.num_gpus)
    log = _Log(Path(run_dir), quiet)
    rm = None
    try:
        if not quiet:
            print(f"ser: {len(task.seed_rows)} seed rows, {len(task.pool)} unlabelled, {len(task.held)} held out; "
                  f"starting {W} reward-model rank(s) on {model_path}", file=sys.stderr, flush=True)
        rm = RewardModelTrainer.from_config(cfg, model_path, tokenizer, device, dtype)
        result = ser_round_loop(cfg, rm, task, out_dir, log)
        if not quiet:
            print(f"ser: stopped ({result.stop}); best round {result.best_round}, held-out accuracy "
                  f"{result.best_accuracy:.3f}; reward model in {result.final_rm}", file=sys.stderr, flush=True)
        return result
    finally:
        log.close()
        if rm is not None:
            rm.shutdown()
        stop_ray(owns)
