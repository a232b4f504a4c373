"""Where metrics go: `metrics.jsonl` in the run dir (always), and W&B when asked.

Each line of metrics.jsonl is one JSON object with a `step`, flushed and
fsynced as it is written, so a killed run loses at most the line being
written. On resume, lines of steps at or after the resumed step are dropped
first, so the file never holds a step twice.
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


class JsonlLogger:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a")

    def truncate_from(self, step: int) -> None:
        """Drop lines whose step >= `step` (and any torn last line)."""
        self._fh.close()
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if row.get("step", -1) < step:
                    kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)
        self._fh = self.path.open("a")

    def log(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


class WandbLogger:
    def __init__(self, cfg: Any, run_dir: Path, config: dict, name: str):
        import wandb

        w = cfg.logger.wandb
        self.run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags) or None,
                              name=w.name or name, mode=w.mode, dir=str(run_dir), config=config,
                              reinit="finish_previous")

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        self.run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fan a metrics row out to every configured sink."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def log(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
