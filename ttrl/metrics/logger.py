"""Where metrics go: `metrics.jsonl` in the run dir (always), and W&B when asked.

Each line of metrics.jsonl is one JSON object with a `step`, flushed and
fsynced as it is written, so a killed run loses at most the line being
written. On resume, lines of steps at or after the resumed step are dropped
first, so the file never holds a step twice.

Every `logger.samples_every` steps a few prompts of the step, some of their
completions, the vote and the rewards go to `samples.jsonl` (one JSON object
per completion, with its `step`) and to a W&B table `samples`.

W&B runs are named after the experiment and the job's overrides
("debug/algorithm=ppo,seed=1"); the jobs of one `-m` sweep share a group
("debug/2025-06-01_12-00-00", from the sweep dir) so that PPO, GRPO and SER
runs line up. The W&B run id is kept in the run dir (`wandb_run.json`), so a
resumed run continues its W&B run. `read_wandb_run` reads an offline run's
`.wandb` file back (the tests use it; so can anyone without network).

This module may see ground truth (the sample table shows it beside the
pseudo-label); nothing here feeds back into training.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of `path` whose step < `step` (dropping any torn line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if row.get("step", -1) < step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(path)


class JsonlLogger:
    """metrics.jsonl (one row per step), samples.jsonl (one row per shown
    completion) and votes.jsonl (one row per prompt voted on in a step)."""

    TABLES = ("samples", "votes")

    def __init__(self, path: Path, samples_path: Path | None = None):
        self.path = path
        self.table_paths = {name: path.with_name(f"{name}.jsonl") for name in self.TABLES}
        if samples_path is not None:
            self.table_paths["samples"] = samples_path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a")
        self._table_fh: dict[str, Any] = {}  # each opened on its first rows

    @property
    def samples_path(self) -> Path:
        return self.table_paths["samples"]

    def truncate_from(self, step: int) -> None:
        """Drop lines whose step >= `step` (and any torn last line), in every file."""
        self._fh.close()
        _truncate_jsonl(self.path, step)
        self._fh = self.path.open("a")
        for fh in self._table_fh.values():
            fh.close()
        self._table_fh.clear()
        for p in self.table_paths.values():
            _truncate_jsonl(p, step)

    def _write(self, fh, row: dict[str, Any]) -> None:
        fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

    def log(self, row: dict[str, Any]) -> None:
        self._write(self._fh, row)

    def log_table(self, name: str, step: int, rows: list[dict[str, Any]]) -> None:
        if name not in self._table_fh:
            self._table_fh[name] = self.table_paths[name].open("a")
        fh = self._table_fh[name]
        for r in rows:
            fh.write(json.dumps({"step": step, **{k: _clean(v) for k, v in r.items()}}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.log_table("samples", step, rows)

    def log_votes(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.log_table("votes", step, rows)

    def close(self) -> None:
        self._fh.close()
        for fh in self._table_fh.values():
            fh.close()


# ── the sample table ─────────────────────────────────────────────────────
SAMPLE_COLUMNS = ["step", "prompt_id", "prompt", "completion", "answer", "pseudo_label", "majority_ratio",
                  "votes", "reward", "ground_truth"]


def sample_rows(groups: list[Any], votes: list[Any], rewards: list[list[float]], max_prompts: int = 4,
                max_samples: int = 4) -> list[dict[str, Any]]:
    """Rows of the sample table: the first `max_prompts` prompts, `max_samples` completions each.

    `groups` are the step's `ttrl.types.Group`s, `votes` their `Vote`s and
    `rewards` the per-sample rewards [P][n_votes]. `votes` is the vote's
    class sizes, e.g. "5: 12, 6: 3, (none): 1"; `ground_truth` is shown for
    reading only (it never reaches the reward).
    """
    rows = []
    for p, (g, v) in enumerate(zip(groups[:max_prompts], votes)):
        n = len(g.samples)
        none = n - sum(v.counts.values())
        counts = ", ".join(f"{a}: {c}" for a, c in sorted(v.counts.items(), key=lambda kv: -kv[1]))
        if none:
            counts += f"{', ' if counts else ''}(none): {none}"
        for i, s in enumerate(g.samples[:max_samples]):
            rows.append({
                "prompt_id": str(g.prompt.id), "prompt": g.prompt.problem, "completion": s.text,
                "answer": s.answer, "pseudo_label": v.label, "majority_ratio": float(v.ratio),
                "votes": counts, "reward": float(rewards[p][i]) if rewards[p][i] is not None else None,
                "ground_truth": g.prompt.answer,
            })
    return rows


# ── W&B ───────────────────────────────────────────────────────────────────
def _hydra() -> Any | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - no Hydra (a test, a notebook): no overrides to name
        return None


def _is_multirun(hc: Any) -> bool:
    from hydra.types import RunMode

    return hc.mode == RunMode.MULTIRUN


def arm_name(cfg: Any) -> str:
    """The arm a run belongs to (a mapping or an OmegaConf config): logger.wandb.job_type, else the default."""
    w = (cfg.get("logger") or {}).get("wandb") or {}
    if w.get("job_type"):
        return str(w["job_type"])
    ser = cfg.get("ser") or {}
    return ("ser+" if ser.get("enabled") else "") + f"{cfg['algorithm']['name']}/{cfg['reward']['name']}"


def run_identity(cfg: Any) -> dict[str, Any]:
    """W&B name, group and tags of this run, from the config and (when there is one) Hydra's job.

    name: `logger.wandb.name`, else "<experiment>/<the job's overrides>".
    group: `logger.wandb.group`, else, in a `-m` sweep, "<experiment>/<sweep dir name>"
    (the same for every job of the sweep), else none.
    tags: `logger.wandb.tags` plus the experiment, algorithm and reward names.
    job_type: `logger.wandb.job_type`, else "<algorithm>/<reward>" ("ser+" in front
    when the run trains its own reward model first): one per arm of a comparison.
    """
    w = cfg.logger.wandb
    hc = _hydra()
    overrides = str(hc.job.override_dirname) if hc is not None else ""
    name = w.name or (f"{cfg.experiment}/{overrides}" if overrides else str(cfg.experiment))
    group = w.group
    if group is None and hc is not None and _is_multirun(hc):
        group = f"{cfg.experiment}/{Path(str(hc.sweep.dir)).name}"
    tags = list(dict.fromkeys([*map(str, w.tags), str(cfg.experiment), str(cfg.algorithm.name),
                               str(cfg.reward.name)]))
    job_type = arm_name(cfg)
    return {"name": name[:128], "group": group[:128] if group else None, "tags": [t[:64] for t in tags],
            "job_type": str(job_type)[:64]}


class WandbSetupError(RuntimeError):
    """W&B could not start (not logged in, bad entity, ...); the message says what to do."""


def _new_run_id() -> str:
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


# (metrics key, alert title, level): the events that page a person.
ALERTS = (("event/collapse", "ttrl: self-training collapse", "WARN"),
          ("event/rollback_to", "ttrl: rolled back", "WARN"),
          ("event/skipped_update", "ttrl: update skipped", "WARN"))


class WandbLogger:
    """One W&B run per ttrl run: config uploaded, metrics against `step`, sample tables."""

    def __init__(self, cfg: Any, run_dir: Path, config: dict, name: str | None = None):
        import wandb

        w = cfg.logger.wandb
        ident = run_identity(cfg)
        # The W&B run id lives in the run dir: a resumed run continues its W&B run.
        id_file = run_dir / "wandb_run.json"
        run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else _new_run_id()
        hc = _hydra()
        config = dict(config)
        config["run"] = {"dir": str(run_dir),
                         "overrides": list(hc.overrides.task) if hc is not None else []}
        try:
            self.run = wandb.init(project=w.project, entity=w.entity, group=ident["group"], tags=ident["tags"],
                                  job_type=ident["job_type"], name=ident["name"], notes=w.notes, mode=w.mode, dir=str(run_dir), config=config,
                                  id=run_id, resume="allow", reinit="finish_previous")
        except wandb.errors.UsageError as err:
            raise WandbSetupError(
                f"logger.wandb.mode={w.mode}: {err} (or set WANDB_API_KEY; logger.wandb.mode=offline logs"
                " without an account, for a later `wandb sync`)") from err
        id_file.write_text(json.dumps({"id": run_id, "name": ident["name"], "group": ident["group"],
                                       "job_type": ident["job_type"],
                                       "project": w.project, "entity": w.entity, "mode": w.mode,
                                       "dir": str(self.run.dir).removesuffix("/files")}))
        # Plot everything against our step (not W&B's internal counter, which a
        # resume does not rewind).
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._table = None

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if v is not None})
        # Collapse warnings, rollbacks and skipped updates also become W&B alerts
        # (email/Slack when the user set them up): nobody watches a run for hours.
        for key, title, level in ALERTS:
            if row.get(key):
                self.run.alert(title=f"{title} at step {row.get('step')}", text=str(row[key]), level=level,
                               wait_duration=0)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        import wandb

        if self._table is None:
            # One growing table (only new rows are uploaded each time).
            self._table = wandb.Table(columns=SAMPLE_COLUMNS, log_mode="INCREMENTAL")
        for r in rows:
            self._table.add_data(step, *[r.get(c) for c in SAMPLE_COLUMNS[1:]])
        self.run.log({"samples": self._table, "step": step})

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fan a metrics row (or a sample table) out to every configured sink."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def log(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(row)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        for s in self.sinks:
            if hasattr(s, "log_samples"):
                s.log_samples(step, rows)

    def log_votes(self, step: int, rows: list[dict[str, Any]]) -> None:
        for s in self.sinks:
            if rows and hasattr(s, "log_votes"):
                s.log_votes(step, rows)

    def truncate_from(self, step: int) -> None:
        for s in self.sinks:
            if hasattr(s, "truncate_from"):
                s.truncate_from(step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def build_loggers(cfg: Any, run_dir: Path) -> Loggers:
    """metrics.jsonl (always) plus W&B when `logger.wandb.enabled` and its mode is not disabled."""
    sinks: list[Any] = [JsonlLogger(run_dir / "metrics.jsonl")]
    w = cfg.logger.wandb
    if w.enabled and w.mode != "disabled":
        from omegaconf import OmegaConf

        try:
            sinks.append(WandbLogger(cfg, run_dir, OmegaConf.to_container(cfg, resolve=True)))
        except BaseException:
            sinks[0].close()
            raise
    return Loggers(sinks)


# ── reading an offline W&B run back ─────────────────────────────────────────
_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B", magic 0xBEE1, version 1


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a `.wandb` file (LevelDB log format: 32 KiB blocks of chunks)."""
    import struct

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a .wandb file")
    records, buf, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # the writer is mid-chunk: the tail is not a record yet
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            records.append(buf + chunk)
            buf = b""
    return records


def read_wandb_run(path: Path, wait_s: float = 30.0) -> dict[str, Any]:
    """What an offline W&B run recorded: {"run": {...}, "config": {...}, "history": [...], "summary": {...}}.

    `path` is a `run-*.wandb` file or an `offline-run-*` dir (or a dir holding
    one, e.g. a ttrl run dir). History rows map metric names to values.
    W&B's service writes the file a moment after `run.finish()` returns: this
    waits up to `wait_s` for the run's closing (exit) record.
    """
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*.wandb"))
        if not found:
            raise FileNotFoundError(f"{path}: no .wandb file under it")
        path = found[-1]
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "alerts": []}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        records, torn = [], None
        for raw in _wandb_records(path):
            rec = pb.Record()
            try:
                rec.ParseFromString(raw)
            except DecodeError as exc:  # read while W&B's service was still writing: read again
                torn = exc
                break
            records.append(rec)
        done = torn is None and any(r.WhichOneof("record_type") == "exit" for r in records)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if torn is not None:
        raise ValueError(f"{path}: record {len(records)} does not parse ({torn}); the file is damaged")
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"id": r.run_id, "project": r.project, "entity": r.entity, "group": r.run_group,
                          "job_type": r.job_type, "name": r.display_name, "tags": list(r.tags), "notes": r.notes}
            out["config"].update({key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "alert":
            out["alerts"].append({"title": rec.alert.title, "text": rec.alert.text, "level": rec.alert.level})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
    out["config"].pop("_wandb", None)
    return out
