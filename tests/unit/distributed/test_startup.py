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


def test_the_start_up_line_says_where_the_seconds_went():
    from ttrl.distributed.startup import ActorTimes, Phases

    ph = Phases(ray_s=4.04, t0=100.0)
    # Engine: asked at 105, process at 105.2, vLLM imported at 112, built at 115.
    ph.engines = [ActorTimes(105.0, 105.2, 112.0, 115.0)]
    # Ranks: rank 1 got its process 2 s late; both set up by 117.
    ph.ranks = [ActorTimes(105.1, 105.3, 109.0, 116.0), ActorTimes(105.1, 107.1, 110.0, 117.0)]
    ph.after["anchor_votes"] = 6.0
    assert ph.line() == ("Ray 4.0 s; 1 engine 10.0 s (process + imports 6.8, vLLM 3.0); 2 ranks 11.9 s (waiting "
                         "2.0, process + imports 3.7, DeepSpeed 7.0); anchor votes 6.0 s")
    d = ph.as_dict()
    assert d["startup/engines_s"] == pytest.approx(10.0) and d["startup/rank_wait_s"] == pytest.approx(2.0)
    assert d["startup/anchor_votes_s"] == 6.0
    # A clock a little off between processes never makes a part negative.
    assert ActorTimes(10.0, 9.5, 12.0, 11.0).parts() == (0.0, 2.0, 0.0)
