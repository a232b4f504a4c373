"""Deliberate crashes at named points of the learner, for the kill tests.

`TTRL_SERVE_CRASH_AT=<point>` in a server's environment makes it SIGKILL
its own process group (the server, its Ray cluster, engines and trainer
ranks: a power cut) the first time it reaches that point:

    round_step           after a learning round's first TTRL step
    version_saving       a promoted version is written, still under its temporary name
    version_saved        a promoted version's folder is on disk, the store does not know it yet
    promotion_committed  the store serves the new version, no engine has it yet

Unset (always, outside tests), `crash_point` costs one dictionary lookup.
Only for a server started in its own session (`start_new_session`), as the
tests do: it kills every process of its group.
"""

from __future__ import annotations

import os
import signal
import sys

POINTS = ("round_step", "version_saving", "version_saved", "promotion_committed")
ENV = "TTRL_SERVE_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) != name:
        return
    print(f"ttrl-serve: {ENV}={name}: killing the process group now", file=sys.stderr, flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)


__all__ = ["ENV", "POINTS", "crash_point"]
