"""A local Ray cluster whose raylet misses Ray's fixed 30 s registration wait is started again.

FakeRay stands in for the ray module: it records init/shutdown calls and fails
the first `fail` inits with Ray's own start-up timeout message.
"""

from __future__ import annotations

import pytest

from ttrl.distributed.ray_setup import ClusterError, init_local

pytestmark = pytest.mark.unit

RAY_TIMEOUT = ("The current node timed out during startup. This could happen because some of the raylet"
               " failed to startup or the GCS has become overloaded.")


class FakeRay:
    def __init__(self, fail: int, message: str = RAY_TIMEOUT):
        self.fail, self.message, self.calls = fail, message, []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs["address"]))
        if self.fail:
            self.fail -= 1
            raise Exception(self.message)

    def shutdown(self):
        self.calls.append(("shutdown", None))


def test_a_start_up_timeout_is_retried_after_a_shutdown(capsys):
    ray = FakeRay(fail=2)
    init_local(ray, attempts=3, pause_s=0, num_cpus=2)
    assert ray.calls == [("init", "local"), ("shutdown", None)] * 2 + [("init", "local")]
    assert capsys.readouterr().out.count("timed out during start-up") == 2


def test_the_last_timeout_is_one_cluster_error_that_says_what_to_check():
    ray = FakeRay(fail=5)
    with pytest.raises(ClusterError, match=r"did not start in 3 tries.*ray stop"):
        init_local(ray, attempts=3, pause_s=0)
    assert [c for c, _ in ray.calls].count("init") == 3


def test_any_other_start_error_is_raised_at_once():
    ray = FakeRay(fail=1, message="port 6379 in use")
    with pytest.raises(Exception, match="port 6379"):
        init_local(ray, attempts=3, pause_s=0)
    assert ray.calls == [("init", "local")]
