"""Wait until a Ray cluster has N alive nodes: `python wait_for_nodes.py HOST:PORT N [TIMEOUT_S]`.

Used by the launch scripts between `ray start` on every node and the run, so
that ttrl-train sees the whole cluster (its resource check would otherwise
fail on a half-started one). Exits 1, naming what joined, on timeout.
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    import ray

    address, want = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 300.0
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            break
        except Exception as err:  # noqa: BLE001 - the head may still be starting
            if time.monotonic() > deadline:
                sys.exit(f"wait_for_nodes: no Ray cluster at {address} after {timeout:.0f}s ({err})")
            time.sleep(2)
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want:
            print(f"wait_for_nodes: {len(alive)} nodes up: {ray.cluster_resources()}", flush=True)
            return
        if time.monotonic() > deadline:
            sys.exit(f"wait_for_nodes: {len(alive)} of {want} nodes joined {address} within {timeout:.0f}s: "
                     f"{[n['NodeManagerAddress'] for n in alive]}")
        time.sleep(2)


if __name__ == "__main__":
    main()
