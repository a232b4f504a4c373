"""Start-up order of engines and trainer ranks (recording fakes stand in for the actors)."""

from __future__ import annotations

import pytest

from ttrl.distributed.startup import bring_up, engines_size_first

pytestmark = pytest.mark.unit


def _recording_side(name, log):
    def start():
        log.append(f"start {name}")

        def wait():
            log.append(f"ready {name}")
            return name
        return wait
    return start


@pytest.mark.parametrize("gpu, colocate, order", [
    # Sharing a GPU: the engines size their KV cache from free memory before DeepSpeed allocates any.
    (True, True, ["start engines", "ready engines", "start trainers", "ready trainers"]),
    # Separate GPUs, or CPU: both load at once.
    (True, False, ["start engines", "start trainers", "ready engines", "ready trainers"]),
    (False, True, ["start engines", "start trainers", "ready engines", "ready trainers"]),
])
def test_engines_size_before_trainers_only_where_they_share_a_gpu(gpu, colocate, order):
    log: list[str] = []
    out = bring_up(_recording_side("engines", log), _recording_side("trainers", log),
                   engines_size_first(gpu, colocate))
    assert out == ("engines", "trainers") and log == order


class RecordingRuntime:
    """Records the engine-memory calls `push_weights` makes (the rest of StepRuntime is not needed)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def wake_engines(self, tags=None):
        self.calls.append(("wake", tuple(tags) if tags else None))

    def sync_weights(self):
        self.calls.append(("sync",))
        return {"bytes": 1.0}


def test_sleeping_engines_wake_weights_then_sync_then_kv_cache():
    from ttrl.step import push_weights

    rt = RecordingRuntime()
    assert push_weights(rt, asleep=True) == {"bytes": 1.0}
    assert rt.calls == [("wake", ("weights",)), ("sync",), ("wake", ("kv_cache",))]
    awake = RecordingRuntime()
    push_weights(awake, asleep=False)
    assert awake.calls == [("sync",)]
