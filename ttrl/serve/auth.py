"""Who is asking: API keys for /v1/*, the admin token for /admin/*.

API keys live in a file of `name:key` lines (`serve.api_keys_file`, or the
file named by $TTRL_API_KEYS_FILE), never on the command line or in the
config: a key there would show in `ps` and be written to config.yaml. A
request sends `Authorization: Bearer <key>`; the key's *name* is the
client's identity, which the store keeps with every query and rating and
which the learner counts (quorums, shares). Without keys every client is
the one identity "anonymous".

A line may name a third field, its tenant (`name:key:tenant`, used with
`serve.tenants`): keys that share a tenant share its adapter. Without the
field a key's tenant is its name; `-` says the key is no tenant and is
answered by the shared served version.

`/admin/*` (versions, rollback, a learning round on demand) changes what is
served, so it takes a token from the environment variable
`serve.admin_token_env` (TTRL_ADMIN_TOKEN). Without it the admin API is off
(403), never open.

Keys and tokens are compared in constant time (every stored key is compared,
whatever matched first) and never logged: errors name the file and line,
never the key. Pure Python.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MIN_TOKEN_CHARS = 8
MIN_KEY_CHARS = 16
ANONYMOUS = "anonymous"
# The tenant field of a key that is no tenant: answered by the shared served version.
SHARED = "-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# Printable ASCII without space and ':' (the field separator).
_KEY = re.compile(r"^[!-9;-~]+$")


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and line, never a key."""


@dataclass(frozen=True)
class Denied:
    status: int  # 401 (no or wrong token) or 403 (admin API off)
    message: str


def load_api_keys(path: str | Path) -> dict[str, str]:
    """name -> key from a file of `name:key` lines (`#` comments and blank lines allowed)."""
    return {name: key for name, (key, _) in _read_keys_file(path).items()}


def load_tenants(path: str | Path) -> dict[str, str | None]:
    """name -> its tenant (the line's third field, else the name itself; None for `-`: no tenant)."""
    return {name: (None if tenant == SHARED else tenant or name)
            for name, (_, tenant) in _read_keys_file(path).items()}


def _read_keys_file(path: str | Path) -> dict[str, tuple[str, str]]:
    """name -> (key, tenant field or "") from a keys file; KeysFileError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KeysFileError(f"cannot read {path}: {type(err).__name__}") from None
    keys: dict[str, str] = {}
    tenants: dict[str, str] = {}
    seen: dict[str, int] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        key, sep2, tenant = rest.partition(":")
        name, key, tenant = name.strip(), key.strip(), tenant.strip()
        where = f"{path} line {no}"
        if not sep or not name or not key or (sep2 and not tenant):
            raise KeysFileError(f"{where} is not a `name:key` line (or `name:key:tenant`)")
        if tenant and tenant != SHARED and not _NAME.match(tenant):
            # A tenant names a folder under <serve.dir>/tenants/: no separators, no leading dot.
            raise KeysFileError(f"{where}: the tenant {tenant!r} must be 1-64 letters, digits or _.@- (starting "
                                f"with a letter or digit), or {SHARED!r} for none")
        if not _NAME.match(name):
            raise KeysFileError(f"{where}: the name {name!r} must be 1-64 letters, digits or _.@- (starting with a "
                                "letter or digit)")
        if name == ANONYMOUS:
            raise KeysFileError(f"{where}: the name {ANONYMOUS!r} is reserved for clients without a key")
        if len(key) < MIN_KEY_CHARS or not _KEY.match(key):
            raise KeysFileError(f"{where}: the key of {name!r} must be at least {MIN_KEY_CHARS} printable ASCII "
                                "characters without spaces or ':'")
        if name in keys:
            raise KeysFileError(f"{where}: the name {name!r} is already on line {seen[name]}")
        digest = hashlib.sha256(key.encode()).hexdigest()
        if any(hashlib.sha256(k.encode()).hexdigest() == digest for k in keys.values()):
            raise KeysFileError(f"{where}: the key of {name!r} is also another name's key")
        keys[name] = key
        tenants[name] = tenant
        seen[name] = no
    if not keys:
        raise KeysFileError(f"{path} holds no `name:key` line")
    return {name: (key, tenants[name]) for name, key in keys.items()}


def loosely_readable(path: str | Path) -> bool:
    """Whether users other than the owner may read the file (a warning, not an error: CI boxes run as root)."""
    try:
        return bool(os.stat(path).st_mode & 0o044)
    except OSError:
        return False


class ApiKeys:
    """Bearer key -> identity, in constant time over all keys."""

    def __init__(self, keys: Mapping[str, str]):
        # Compare digests: equal length whatever was sent, so compare_digest's time says nothing.
        self._entries = [(name, hashlib.sha256(key.encode()).digest()) for name, key in keys.items()]

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        return cls(load_api_keys(path))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._entries]

    def identify(self, presented: str | None) -> str | None:
        """The name of the presented key, or None."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, stored in self._entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


def resolve_admin_token(env_name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The environment's admin token, or None (admin API off)."""
    environ = os.environ if environ is None else environ
    token = (environ.get(env_name) if env_name else None) or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token (${env_name}) must have at least {MIN_TOKEN_CHARS} characters")
    return token


def bearer(headers: Mapping[str, str]) -> str | None:
    """The bearer credential a request carries (header names are case-insensitive)."""
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The admin token a request carries: a bearer credential or X-Admin-Token."""
    lower = {k.lower(): v for k, v in headers.items()}
    return bearer(headers) or lower.get("x-admin-token") or None


def is_admin(headers: Mapping[str, str], token: str | None) -> bool:
    given = presented_token(headers)
    return token is not None and given is not None and hmac.compare_digest(
        hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest(), hashlib.sha256(token.encode()).digest())


def check_admin(headers: Mapping[str, str], token: str | None) -> Denied | None:
    """None when the request may use the admin API, else why not."""
    if token is None:
        return Denied(403, "the admin API is off: set the TTRL_ADMIN_TOKEN environment variable "
                           "(serve.admin_token_env)")
    if presented_token(headers) is None:
        return Denied(401, "admin token missing: send 'Authorization: Bearer <token>'")
    if not is_admin(headers, token):
        return Denied(401, "admin token invalid")
    return None


__all__ = ["ANONYMOUS", "SHARED", "ApiKeys", "Denied", "KeysFileError", "bearer", "check_admin", "is_admin",
           "load_api_keys", "load_tenants", "loosely_readable", "presented_token", "resolve_admin_token"]
