"""A free TCP port to listen on: for rendezvous addresses, test servers and
the clusters tests start. Standard library only (the GPU checks run where
Ray is not installed). It must never hold the port it returns, so another
process may take it before the caller binds it: a small race every caller
accepts."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on `host` now ("" for every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
