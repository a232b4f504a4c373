"""Replay the collapse guard's label-free vote signals on a finished run.

A run writes every vote it took to votes.jsonl (the anchor votes as step 0,
then one row per prompt and step: label, majority ratio, number of answer
classes). `replay_run` feeds those rows, step by step, through the same
`VoteTracker` and `CollapseDetector` a live run uses, with whatever safety
limits it is given, and says at which step the guard would have fired. It
is how the limits in SafetyConfig were calibrated and how a user checks a
new limit against runs they already have, without re-running anything.

    python -m ttrl.metrics.replay RUN_DIR [RUN_DIR ...] [max_consensus_drop=0.05 ...]

Reads votes.jsonl and metrics.jsonl (or their .gz copies) only; never reads a graded key (eval/*,
label/accuracy) into the guard, and must never write into the run dir.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttrl.metrics.jsonl import jsonl_file, read_jsonl_rows
from ttrl.metrics.safety import CollapseDetector, VoteTracker


@dataclass
class _Vote:
    label: str | None
    ratio: float
    classes: int
    # Class sizes, the winner first, and the samples voted: from the row, or
    # rebuilt from ratio, margin and class count (`_sizes`); None: no floor.
    sizes: list[int] | None = None
    n: int = 0

    @property
    def counts(self) -> range:  # VoteTracker only takes len(counts)
        return range(self.classes)


@dataclass
class Replay:
    fired_at: int | None
    reason: str | None
    anchored: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def replay_votes(vote_rows: Iterable[dict[str, Any]], safety: Any,
                 metric_rows: Iterable[dict[str, Any]] = (), n_votes: int | None = None) -> Replay:
    """The guard's course over recorded votes (and the label-free keys of the matching metric rows).

    `n_votes` (the run's rollout.n_votes) lets rows written before votes.jsonl
    kept class sizes get a drift floor (`_sizes`); without it they get none.
    """
    by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in vote_rows:
        by_step[int(r["step"])].append(r)
    extra = {int(r["step"]): {k: v for k, v in r.items() if k.startswith(("train/", "rollout/", "label/majority", "label/vote_alignment"))}
             for r in metric_rows if "step" in r}
    tracker = VoteTracker(safety.flip_confident)
    anchor = by_step.pop(0, [])
    tracker.anchor([r["id"] for r in anchor], [_vote(r, n_votes) for r in anchor])
    detector = CollapseDetector(safety)
    out = Replay(None, None, len(anchor))
    for step in sorted(by_step):
        rows = by_step[step]
        row = {"step": step, **extra.get(step, {}),
               **tracker.update([r["id"] for r in rows], [_vote(r, n_votes) for r in rows])}
        events = detector.update(row)
        if events and out.fired_at is None:
            out.fired_at, out.reason = step, "; ".join(e.message for e in events)
        out.rows.append(row)
    return out


def _vote(r: dict[str, Any], n_votes: int | None = None) -> _Vote:
    classes = int(r.get("classes", 1))
    if r.get("sizes") is not None:
        return _Vote(r.get("label"), float(r["ratio"]), classes, [int(x) for x in r["sizes"]], int(r["n"]))
    sizes = _sizes(float(r["ratio"]), r.get("margin"), classes, n_votes) if n_votes else None
    return _Vote(r.get("label"), float(r["ratio"]), classes, sizes, n_votes or 0)


def _sizes(ratio: float, margin: float | None, classes: int, n: int) -> list[int] | None:
    """Class sizes rebuilt from a row written before votes.jsonl kept them (ratio, margin, class count).

    The two largest classes are exact (ratio and margin are shares of `n`);
    the others' answers are spread evenly over them, none above the second,
    and what cannot fit counts as no answer. Rows without a margin: None.
    """
    if margin is None:
        return None
    top = round(ratio * n)
    if classes <= 1 or top == 0:
        return [top] if top else []
    second = max(top - round(float(margin) * n), 0)
    sizes = [top, second]
    left, others = max(n - top - second, 0), classes - 2
    for i in range(others):
        share = min(second, left // (others - i) + (1 if left % (others - i) else 0))
        sizes.append(share)
        left -= share
    return sizes


def replay_run(run_dir: str | Path, own_config: bool = True, **limits: Any) -> Replay:
    """`replay_votes` on a run dir: the run's own safety config (or, with
    `own_config=False`, today's defaults, to judge an old run by the current
    guard), overridden by `limits` (each checked by `set_limit`: a bad key
    or value is a ValueError naming it)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    votes = jsonl_file(run_dir, "votes.jsonl")
    if votes is None:
        raise FileNotFoundError(f"{run_dir / 'votes.jsonl'}: no votes recorded "
                                "(a reward that does not vote writes none)")
    cfg_path = run_dir / "config.yaml"
    cfg = OmegaConf.load(cfg_path) if cfg_path.exists() else OmegaConf.create()
    safety = safety_section(cfg.get("safety") if own_config else None, str(cfg_path), **limits)
    metrics = jsonl_file(run_dir, "metrics.jsonl")
    n_votes = cfg.get("rollout", {}).get("n_votes")
    return replay_votes(read_jsonl_rows(votes), safety, read_jsonl_rows(metrics) if metrics else (), n_votes)


def safety_section(given: Any = None, source: str = "the run's config", **limits: Any) -> Any:
    """A SafetyConfig: today's defaults, `given`'s keys over them, then `limits`.

    Checked through OmegaConf's typed config, handed back as the plain
    dataclass: the replay reads its limits on every step of every run, and a
    DictConfig's attribute reads are many times slower.

    `given` is a run's safety section (a mapping, DictConfig or dataclass);
    keys SafetyConfig does not have (a run of another version) are ignored.
    Its keys and each limit are checked by `set_limit` (a run's value of the
    wrong type is one ValueError naming `safety.<key>` and `source`). The one way the
    replay and the collapse reports build the guard's settings.
    """
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from ttrl.config import SafetyConfig

    safety = OmegaConf.structured(SafetyConfig)
    if given is not None:
        mine = (OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given)
                else asdict(given) if hasattr(given, "__dataclass_fields__") else dict(given))
        for key, value in mine.items():
            if key in SafetyConfig.__dataclass_fields__:
                try:
                    set_limit(safety, key, value)
                except ValueError as err:
                    raise ValueError(f"safety.{err}, in {source}") from None
    for key, value in limits.items():
        set_limit(safety, key, value)
    return OmegaConf.to_object(safety)


def parse_limits(items: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE arguments as safety limits: a `safety.` prefix dropped,
    values read as YAML (0.15, 1e-3) and checked against SafetyConfig's
    types (`set_limit`); null, none or None turns a limit off.

    A bad item raises one ValueError that starts with its key (or the whole
    item, when it has none), for the caller to put its flag or name before.
    """
    import yaml
    from omegaconf import OmegaConf

    from ttrl.config import SafetyConfig

    typed = OmegaConf.structured(SafetyConfig)
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key, value = key.strip().removeprefix("safety."), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"{item}: give KEY=VALUE, e.g. max_excess_drift=0.15 (null turns a limit off)")
        try:
            parsed = None if value.lower() in ("null", "none", "~") else yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"{key}: {value!r} is not a value for it ({type(err).__name__})") from None
        out[key] = set_limit(typed, key, parsed, shown=value)
    return out


def set_limit(safety: Any, key: str, value: Any, shown: str | None = None) -> Any:
    """`safety.<key> = value` on a typed (structured) SafetyConfig, and the value as the key holds it.

    The one check of a limit's key and value, for the command lines and
    `replay_run`'s keyword limits alike: an unknown key, a value of the wrong
    type or NaN raises one ValueError that starts with the key.
    """
    from omegaconf.errors import OmegaConfBaseException

    from ttrl.config import SafetyConfig

    keys = SafetyConfig.__dataclass_fields__
    shown = repr(value) if shown is None else repr(shown)
    if key not in keys:
        raise ValueError(f"{key}: not a safety key (choices: {', '.join(sorted(keys))})")
    try:
        # YAML 1.1 reads 1e-3 as text; the typed config turns it into the float the key holds.
        safety[key] = value
    except (OmegaConfBaseException, ValueError) as err:
        raise ValueError(f"{key}: {shown} is not a value for it ({type(err).__name__})") from None
    if isinstance(safety[key], float) and safety[key] != safety[key]:
        raise ValueError(f"{key}: {shown} is not a value for it (NaN; null turns a limit off)")
    return safety[key]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A run dir may have "=" in its name (a multirun's job dirs do): a path that exists is a run dir.
    dirs = [a for a in argv if "=" not in a or Path(a).is_dir()]
    try:
        limits = parse_limits(a for a in argv if a not in dirs)
    except ValueError as err:
        print(f"ttrl.metrics.replay: {err}", file=sys.stderr)
        return 2
    if not dirs:
        print(__doc__.split("\n\n")[2].strip(), file=sys.stderr)
        return 2
    for d in dirs:
        r = replay_run(d, **limits)
        worst = min((x["label/consensus_change"] for x in r.rows if "label/consensus_change" in x), default=None)
        peak = max((x["label/first_vote_drift"] for x in r.rows if "label/first_vote_drift" in x), default=None)
        verdict = f"fired at step {r.fired_at}: {r.reason}" if r.fired_at else "quiet"
        print(f"{d}: {verdict} "
              f"(anchor votes {r.anchored}; steps {len(r.rows)}; "
              f"lowest consensus change {worst if worst is None else round(worst, 3)}, "
              f"highest drift {peak if peak is None else round(peak, 3)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
