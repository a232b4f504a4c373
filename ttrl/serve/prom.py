"""Counters, gauges and histograms rendered as Prometheus text (exposition format 0.0.4).

Small and dependency-free on purpose: `/metrics` must never fail, and the
format is easy to get right and to test. Thread-safe (request handlers,
the learner thread and the store writer all record). Pure Python.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[tuple[str, str], ...]


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _labels_text(key: LabelKey, extra: Sequence[tuple[str, str]] = ()) -> str:
    pairs = list(key) + list(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs) + "}"


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        for label in labelnames:
            if not _LABEL.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"bad label name {label!r} for {name}")
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> LabelKey:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple((k, str(labels[k])) for k in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        super().__init__(name, help, labelnames)
        self._values: dict[LabelKey, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_labels_text(k)} {format_value(v)}" for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 fn: Callable[[], float] | None = None):
        super().__init__(name, help, labelnames)
        if fn is not None and labelnames:
            raise ValueError("a callback gauge has no labels")
        self._fn = fn
        self._values: dict[LabelKey, float] = {} if labelnames else {(): 0.0}

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def value(self, **labels: object) -> float:
        if self._fn is not None:
            return float(self._fn())
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        if self._fn is not None:
            try:
                v = float(self._fn())
            except Exception:  # noqa: BLE001 - /metrics must render even if a callback fails
                v = float("nan")
            return [f"{self.name} {format_value(v)}"]
        with self._lock:
            return [f"{self.name}{_labels_text(k)} {format_value(v)}" for k, v in sorted(self._values.items())]


DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS):
        super().__init__(name, help, labelnames)
        b = sorted(float(x) for x in buckets)
        if not b or any(math.isinf(x) for x in b) or len(set(b)) != len(b):
            raise ValueError(f"{name}: buckets must be distinct finite numbers")
        self.buckets = tuple(b)
        self._data: dict[LabelKey, list[float]] = {}  # per key: counts per bucket..., +Inf count, sum

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            d = self._data.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, ub in enumerate(self.buckets):
                if value <= ub:
                    d[i] += 1
            d[-2] += 1
            d[-1] += value

    def count(self, **labels: object) -> float:
        with self._lock:
            d = self._data.get(self._key(labels))
            return d[-2] if d else 0.0

    def samples(self) -> list[str]:
        out = []
        with self._lock:
            items = sorted(self._data.items()) or ([((), [0.0] * (len(self.buckets) + 2))] if not self.labelnames
                                                  else [])
            for key, d in items:
                for ub, c in zip(self.buckets, d):
                    out.append(f"{self.name}_bucket{_labels_text(key, [('le', repr(float(ub)))])} {format_value(c)}")
                out.append(f"{self.name}_bucket{_labels_text(key, [('le', '+Inf')])} {format_value(d[-2])}")
                out.append(f"{self.name}_sum{_labels_text(key)} {format_value(d[-1])}")
                out.append(f"{self.name}_count{_labels_text(key)} {format_value(d[-2])}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def _add(self, m: _Metric) -> _Metric:
        with self._lock:
            if m.name in self._metrics:
                raise ValueError(f"metric {m.name} registered twice")
            self._metrics[m.name] = m
        return m

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = (),
              fn: Callable[[], float] | None = None) -> Gauge:
        return self._add(Gauge(name, help, labelnames, fn))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for m in metrics:
            lines += m.header() + m.samples()
        return "\n".join(lines) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "Registry", "escape_label_value", "format_value"]
