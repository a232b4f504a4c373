"""A model per tenant (`serve.tenants`): who is which tenant, and each tenant's adapter on disk.

With tenants on, every API key belongs to a tenant (its name, or the third
field of its line: `ttrl.serve.auth.load_tenants`), and each tenant is
served its own LoRA adapter on the one shared base:

    <serve.dir>/tenants/<name>/adapter/      peft dir: adapter_config.json, adapter_model.safetensors
    <serve.dir>/tenants/<name>/tenant.json   {"name", "id", "created", "from_version"}
    <serve.dir>/tenants/<name>/versions/v<N>/   what its learning rounds promoted (`Versions` dirs:
                                             policy/ the adapter, policy_ds/ the trainer state)

A tenant is created on its first request: its adapter is a copy of the
served version's adapter (`<serve.dir>/versions/v<N>/policy/`; at v0 with
model.lora's default init its B matrices are zero, so a new tenant answers
exactly as the base does), unless an adapter is already in its folder (one
an operator or a test wrote there with `write_adapter`). Its int id, which
its vLLM LoRARequest carries, is given once and kept in tenant.json, so it is
stable across restarts; id 1 is the shared adapter's
(`ttrl.rollout.lora.ADAPTER_ID`), tenants count from 2.

Folders are written under a temporary name and renamed into place, so a
crash never leaves half an adapter that a later start would serve. Only the
server process assigns ids (one lock); other processes may write adapters.

Learning (issue 32 phase 2): a tenant's round promotes a new version folder;
`serve_version` points the tenant at its `policy/` (the store says which
version each tenant is served, so a restart does the same). The tenant keeps
its int id: the engine sees a new folder for the id, drops the old adapter
and its prefix cache (`VLLMEngine.generate_tenants`). `RoundQueue` takes the
tenants whose queries make a round due in turn, round-robin.

Must never import ray or vllm, or talk to an engine: the engines read the
adapter folders themselves (`VLLMEngine.generate_tenants`).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttrl.rollout.lora import ADAPTER_ID, CONFIG_FILE, WEIGHTS_FILE
from ttrl.rundir import write_atomic
from ttrl.serve.versions import Versions, fsync_dir, fsync_tree

FIRST_ID = ADAPTER_ID + 1
INFO_FILE = "tenant.json"


@dataclass(frozen=True)
class TenantAdapter:
    """What an engine needs to serve a tenant: its name, its stable int id, its adapter folder."""

    name: str
    id: int
    path: str

    def wire(self) -> tuple[str, int, str]:
        """As it crosses Ray to the engine (plain data)."""
        return (self.name, self.id, self.path)


def adapter_dir(root: str | Path, name: str) -> Path:
    return Path(root) / name / "adapter"


def _install_dir(tmp: Path, final: Path) -> None:
    """Rename a complete, synced folder into place (replacing an older one) and sync its parent."""
    fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_adapter(root: str | Path, name: str, tensors: Mapping[str, Any], spec: Mapping[str, Any],
                  base: str | None = None) -> Path:
    """Write (or replace) tenant `name`'s adapter: peft format, wire names, atomically.

    An engine that holds the tenant's old adapter keeps serving it until it
    unloads it (least recently used) or restarts: only a new folder (a
    promoted version, `serve_version`) is reloaded on demand, so write a
    tenant's adapter before its first request.
    """
    from ttrl.rollout.lora import write_adapter as write_peft

    final = adapter_dir(root, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_peft(tmp, tensors, dict(spec), base)
    _install_dir(tmp, final)
    return final


class Tenants:
    """The tenants of one serve dir: created on first use, each with a stable id and an adapter folder."""

    def __init__(self, root: str | Path, served_adapter: Callable[[], Path], key_tenants: Mapping[str, str | None]):
        # served_adapter(): the served version's adapter folder, what a new tenant starts from.
        # key_tenants: API key name -> its tenant (None: the key is served the shared version).
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.served_adapter = served_adapter
        self.key_tenants = dict(key_tenants)
        self._lock = threading.Lock()
        self._known: dict[str, TenantAdapter] = {}
        for info in sorted(self.root.glob(f"*/{INFO_FILE}")):
            row = json.loads(info.read_text())
            if (info.parent / "adapter" / CONFIG_FILE).is_file():
                self._known[row["name"]] = TenantAdapter(row["name"], int(row["id"]), str(info.parent / "adapter"))
        self.created = 0  # tenants created by this process
        self.on_create: Callable[[str], None] | None = None  # told each new tenant's name (/metrics counts them)
        self._version: dict[str, int] = {}  # tenant -> the promoted version it is served (absent: its adapter/)

    def versions(self, name: str) -> Versions:
        """Tenant `name`'s promoted versions on disk: <root>/<name>/versions/v<N>/."""
        return Versions(self.root / name / "versions")

    def origin(self, name: str) -> int | None:
        """The shared version tenant `name`'s adapter was copied from (None: an adapter placed by hand)."""
        info = self.root / name / INFO_FILE
        src = json.loads(info.read_text()).get("from_version") if info.is_file() else None
        return int(src[1:]) if isinstance(src, str) and src[1:].isdigit() else None

    def serve_version(self, name: str, version: int) -> dict[str, Any]:
        """Serve tenant `name` its promoted `version` from now on (same id, the version's adapter folder).

        The engines read the folder on the tenant's next request; requests
        already in an engine finish with the adapter they started with.
        """
        path = self.versions(name).hf_dir(version)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"tenant {name!r}: version v{version} has no adapter at {path}")
        with self._lock:
            old = self._known.get(name)
            if old is None:
                raise KeyError(f"unknown tenant {name!r}")
            self._known[name] = TenantAdapter(name, old.id, str(path))
            self._version[name] = version
        return {"tenant": name, "version": version, "path": str(path), "previous": old.path}

    def version_of(self, name: str) -> int | None:
        with self._lock:
            return self._version.get(name)

    def tenant_of(self, identity: str) -> str | None:
        """The tenant of an API key's name; None for a key marked `-` (the shared version).

        KeyError for an identity that is no key of the file (anonymous): the
        caller refuses it rather than serve it some model silently.
        """
        return self.key_tenants[identity]

    def get(self, name: str) -> TenantAdapter:
        """Tenant `name`'s adapter, creating the tenant (adapter copied from the served version) on first use."""
        with self._lock:
            known = self._known.get(name)
            if known is not None:
                return known
            d = adapter_dir(self.root, name)
            used = [t.id for t in self._known.values()]
            t = TenantAdapter(name, max(used, default=FIRST_ID - 1) + 1, str(d))

            def write_info(from_version: str | None) -> None:
                write_atomic(d.parent / INFO_FILE, json.dumps({"name": name, "id": t.id, "created": time.time(),
                                                               "from_version": from_version}, indent=1))
                fsync_dir(d.parent)

            if (d / CONFIG_FILE).is_file():
                self._check(d)
                write_info(None)
            else:
                src = self.served_adapter()
                d.parent.mkdir(parents=True, exist_ok=True)
                # Where the adapter came from is on disk before the adapter is: a crash between the two
                # otherwise left a copied adapter that looked placed by hand, which no round may train.
                write_info(src.parent.name)
                tmp = d.with_name(d.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for f in (CONFIG_FILE, WEIGHTS_FILE):  # the adapter alone, not peft's README or anything else
                    shutil.copy2(src / f, tmp / f)
                _install_dir(tmp, d)
            self._known[name] = t
            self.created += 1
            if self.on_create is not None:
                self.on_create(name)
            return t

    def _check(self, d: Path) -> None:
        """An adapter someone put in a tenant's folder must fit the engines' LoRA slots: the served adapter's
        rank and targets, its tensor names and shapes, finite values, a file that reads. ValueError naming the
        folder (and the tensor), before any engine tries it: a failed load inside vLLM fails the whole batch,
        other tenants' requests included."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ttrl.rollout.lora import read_spec

        served_dir = self.served_adapter()
        try:
            own, served = read_spec(d), read_spec(served_dir)
        except (ValueError, OSError) as err:  # a config that is not JSON, or not a LoRA config we serve
            raise ValueError(f"the adapter at {d} cannot be read: {err}") from None
        for key in ("r", "target_modules"):
            if own[key] != served[key]:
                raise ValueError(f"the adapter at {d} has {key}={own[key]}, the served adapter (model.lora) "
                                 f"{key}={served[key]}; the engines serve only adapters of the served one's shape")
        try:
            tensors = load_file(str(d / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"the adapter at {d}: {WEIGHTS_FILE} cannot be read ({err})") from None
        expected = {k: tuple(t.shape) for k, t in load_file(str(served_dir / WEIGHTS_FILE)).items()}
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"the adapter at {d} does not hold the served adapter's tensors: "
                             + "; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                                     f"unexpected {extra[:3]}" if extra else "") if x))
        for name, t in tensors.items():
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"the adapter at {d}: {name} has shape {tuple(t.shape)}, the served adapter's "
                                 f"is {expected[name]}")
            if not t.is_floating_point() or not bool(t.isfinite().all()):
                raise ValueError(f"the adapter at {d}: {name} holds non-finite values (or is not floating point)")

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": t.name, "id": t.id, "path": t.path, "version": self._version.get(t.name)}
                    for t in sorted(self._known.values(), key=lambda t: t.id)]


class TenantLabels:
    """The `tenant` label of the per-tenant /metrics counters, with a cardinality cap.

    The first `cap` tenants seen get their own label value; every later one
    is counted under OTHER, so a server with thousands of tenants keeps a
    bounded number of series (serve.tenants.metrics_max_tenants).
    """

    OTHER = "_other"

    def __init__(self, cap: int):
        self.cap = cap
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def label(self, name: str) -> str:
        with self._lock:
            if name in self._named:
                return name
            if len(self._named) < self.cap:
                self._named.add(name)
                return name
            return self.OTHER


def ready_tenants(unused: Mapping[str, int], seen: Mapping[str, int], every_queries: int, min_queries: int,
                  manual: bool = False, timely: bool = False) -> list[str]:
    """The tenants a round may be for now, by name.

    unused: tenant -> its unused trainable queries; seen: tenant -> that
    count right after its last round (0 when none), so that only queries
    that arrived since count towards the next. A tenant with fewer than
    `min_queries` unused queries always waits. Otherwise it is ready when
    `every_queries` (> 0) new ones arrived, when the time is up (`timely`,
    serve.learn.every_seconds) and `min_queries` new ones arrived, or on a
    manual trigger.
    """
    out = []
    for name, n in unused.items():
        if n < max(1, min_queries):
            continue
        new = n - seen.get(name, 0)
        if manual or (every_queries > 0 and new >= every_queries) or (timely and new >= max(1, min_queries)):
            out.append(name)
    return sorted(out)


class RoundQueue:
    """Whose round is next: round-robin over the ready tenants, in name order from the last one served.

    No tenant gets a second round while another ready tenant waits for its
    first: a busy tenant cannot starve a quiet one. Pure; the learner tells
    it each round it ran (`done`).
    """

    def __init__(self) -> None:
        self.last: str | None = None

    def pick(self, ready: Iterable[str]) -> str | None:
        ready = sorted(set(ready))
        if not ready:
            return None
        later = [t for t in ready if self.last is None or t > self.last]
        return (later or ready)[0]

    def done(self, name: str) -> None:
        self.last = name


__all__ = ["FIRST_ID", "INFO_FILE", "RoundQueue", "TenantAdapter", "TenantLabels", "Tenants", "adapter_dir", "ready_tenants",
           "write_adapter"]
