"""The admin token: where it comes from and how a request proves it has it.

`/admin/*` (versions, rollback, a learning round on demand) changes what is
served, so it takes a token: `serve.admin_token`, else the environment
variable `serve.admin_token_env` (TTRL_ADMIN_TOKEN). With neither, the
admin API is off (403), never open. A request sends
`Authorization: Bearer <token>` (or `X-Admin-Token: <token>`); tokens are
compared in constant time. Pure Python.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

MIN_TOKEN_CHARS = 8


@dataclass(frozen=True)
class Denied:
    status: int  # 401 (no or wrong token) or 403 (admin API off)
    message: str


def resolve_admin_token(configured: str | None, env_name: str | None,
                        environ: Mapping[str, str] | None = None) -> str | None:
    """The configured token, else the environment's, else None (admin API off)."""
    environ = os.environ if environ is None else environ
    token = configured or (environ.get(env_name) if env_name else None) or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
    return token


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The token a request carries (header names are case-insensitive)."""
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return lower.get("x-admin-token") or None


def check_admin(headers: Mapping[str, str], token: str | None) -> Denied | None:
    """None when the request may use the admin API, else why not."""
    if token is None:
        return Denied(403, "the admin API is off: set serve.admin_token or the TTRL_ADMIN_TOKEN environment variable")
    given = presented_token(headers)
    if given is None:
        return Denied(401, "admin token missing: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.encode(), token.encode()):
        return Denied(401, "admin token invalid")
    return None


__all__ = ["Denied", "check_admin", "presented_token", "resolve_admin_token"]
