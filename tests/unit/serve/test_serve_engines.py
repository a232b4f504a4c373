"""EnginePool on fake engine actors: batching, hot swaps between batches, recovery, back-pressure."""

from __future__ import annotations

import asyncio

import pytest

from ttrl.serve.engines import EnginePool, EngineUnavailable, Overloaded, QueueShare
from ttrl.serve.testing import FakeDeath, FakeEngine

KEY = (1, 1.0, 1.0, -1, 16, None)


def _pool(engines, **kw) -> EnginePool:
    return EnginePool(engines, 0, death_errors=(FakeDeath,), **kw)


def run(coro):
    return asyncio.run(coro)


def test_waiting_requests_go_out_together_whatever_their_sampling_parameters():
    async def main():
        eng = FakeEngine(delay=0.05)
        pool = _pool([eng])
        await pool.start()
        other = (4, 0.7, 1.0, -1, 16, None)
        seeded = [(1, 1.0, 1.0, -1, 16, 1000 + i) for i in range(5)]  # a client that varies its seed
        reqs = ([pool.generate([i + 1], KEY) for i in range(10)] + [pool.generate([99], other)]
                + [pool.generate([7], k, "seeder") for k in seeded])
        outs = await asyncio.gather(*reqs)
        await pool.stop()
        return eng, outs

    eng, outs = run(main())
    assert [len(o[0]) for o in outs] == [1] * 10 + [4] + [1] * 5, "n samples per prompt, as each key asks"
    calls = [e for e in eng.log if e[0] == "generate"]
    assert sum(n for _, n, _, _ in calls) == 16 and len(calls) <= 2, f"requests were not batched: {calls}"
    assert any(len({k[5] for k in keys}) > 2 for *_, keys in calls), "different seeds shared one engine call"


def test_a_swap_falls_between_batches_and_answers_carry_their_version():
    async def main():
        eng = FakeEngine(delay=0.05)
        pool = _pool([eng])
        await pool.start()
        first = [asyncio.ensure_future(pool.generate([i + 1], KEY)) for i in range(5)]
        await asyncio.sleep(0.01)  # the first batch is in flight
        swap = asyncio.ensure_future(pool.swap(1, [b"weights"]))
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(pool.generate([i + 1], KEY)) for i in range(5)]
        stats = await swap
        results = await asyncio.gather(*first, *later)
        await pool.stop()
        return eng, stats, results

    eng, stats, results = run(main())
    for samples, version in results:
        assert samples[0]["text"] == f"The answer is \\boxed{{v{version}}}", "version tag = weights that answered"
    assert [v for _, v in results[:5]] == [0] * 5, "the batch in flight finished on the old weights"
    assert [v for _, v in results[5:]] == [1] * 5, "requests during the swap waited and got the new weights"
    kinds = [e[0] for e in eng.log]
    assert kinds == ["generate", "load", "generate"], eng.log
    assert stats["version"] == 1 and stats["max_pause_s"] > 0


def test_a_swap_walks_several_engines_one_at_a_time_while_the_others_serve():
    async def main():
        engines = [FakeEngine(delay=0.03), FakeEngine(delay=0.03)]
        pool = _pool(engines)
        await pool.start()
        loads = []

        async def traffic():
            out = []
            for i in range(30):
                out.append(await pool.generate([i + 1], KEY))
                loads.append(tuple(e.loading for e in pool.engines))
            return out

        t = asyncio.ensure_future(traffic())
        await asyncio.sleep(0.05)
        await pool.swap(1, [b"w"])
        out = await t
        await pool.stop()
        return engines, out, loads

    engines, out, loads = run(main())
    assert all(e.version == 1 for e in engines)
    assert not any(all(state) for state in loads), "two engines were never loading at once"
    versions = [v for _, v in out]
    assert versions == sorted(versions) and versions[-1] == 1


def test_a_dead_engine_is_recovered_with_the_served_weights_and_its_requests_retried():
    async def main():
        eng = FakeEngine(delay=0.01)
        loaded = []

        def blobs_for(v):
            loaded.append(v)
            return [b"v%d" % v]

        pool = _pool([eng], blobs_for=blobs_for)
        await pool.start()
        await pool.swap(3, [b"w"])
        eng.dead = True
        eng.version = 0  # Ray restarts the actor from the original weights

        async def revive():
            await asyncio.sleep(1.5)
            eng.dead = False

        asyncio.ensure_future(revive())
        out = await asyncio.gather(*(pool.generate([i + 1], KEY) for i in range(4)))
        await pool.stop()
        return eng, out, loaded, pool

    eng, out, loaded, pool = run(main())
    assert loaded == [3], "the restarted engine got the served version from disk"
    assert [v for _, v in out] == [3] * 4 and eng.version == 3
    assert pool.engines[0].restarts == 1 and pool.engines[0].alive


def test_a_full_queue_refuses_at_once_and_other_errors_reach_the_caller():
    async def main():
        eng = FakeEngine(delay=0.2)
        pool = _pool([eng], max_queue=2)
        await pool.start()
        a = asyncio.ensure_future(pool.generate([1], KEY))
        await asyncio.sleep(0.01)  # a is in flight; the queue is empty again
        b = asyncio.ensure_future(pool.generate([2], KEY))
        c = asyncio.ensure_future(pool.generate([3], KEY))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await pool.generate([4], KEY)
        await asyncio.gather(a, b, c)

        def boom(ids, version, j):
            raise ValueError("bad prompt")

        eng.answer = boom
        with pytest.raises(ValueError, match="bad prompt"):
            await pool.generate([5], KEY)
        await pool.stop()
        with pytest.raises(EngineUnavailable):
            await pool.generate([6], KEY)

    run(main())


def test_an_engine_that_never_comes_back_fails_its_requests_instead_of_hanging():
    async def main():
        eng = FakeEngine(delay=0.01)
        pool = _pool([eng], recover_timeout_s=0.5, blobs_for=lambda v: [])
        await pool.start()
        eng.dead = True
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(pool.generate([1], KEY), timeout=10)
        with pytest.raises(EngineUnavailable, match="no rollout engine is alive"):
            await pool.generate([2], KEY)
        assert pool.stats()["engines"][0]["lost"]
        await pool.stop()

    run(main())


def test_a_client_with_a_backlog_does_not_starve_another():
    async def main():
        eng = FakeEngine(delay=0.02)
        pool = _pool([eng], max_batch=4)
        await pool.start()
        flood = [asyncio.ensure_future(pool.generate([i + 1], KEY, "flooder")) for i in range(40)]
        await asyncio.sleep(0.005)  # the first batch is in flight, 36 wait
        polite = (1, 1.0, 1.0, -1, 16, 42)  # its own seed: to find it in the engine's log
        await pool.generate([999], polite, "polite")
        await asyncio.gather(*flood)
        await pool.stop()
        return eng, polite

    eng, polite = run(main())
    calls = [keys for kind, _, _, keys in eng.log if kind == "generate"]
    assert len(calls) == 11
    assert polite in calls[1], "the polite request went out right after the batch in flight, not behind 36"


def test_a_request_the_engine_refuses_fails_alone():
    async def main():
        eng = FakeEngine(delay=0.02, refuse=lambda ids: ids == [666])
        pool = _pool([eng])
        await pool.start()
        outs = await asyncio.gather(*(pool.generate([i + 1], KEY) for i in range(5)), pool.generate([666], KEY),
                                    return_exceptions=True)
        await pool.stop()
        return outs

    outs = run(main())
    assert all(isinstance(o, tuple) for o in outs[:5]) and isinstance(outs[5], ValueError)


def test_a_swap_that_fails_on_the_second_engine_puts_the_first_back():
    from ttrl.serve.engines import SwapFailed

    async def main():
        engines = [FakeEngine(delay=0.01), FakeEngine(delay=0.01, fail_load=lambda v: v == 2)]
        pool = _pool(engines, blobs_for=lambda v: [b"v%d" % v])
        await pool.start()
        await pool.swap(1, [b"w1"])
        with pytest.raises(SwapFailed, match="engine 1 could not load v2.*every engine serves v1 again"):
            await pool.swap(2, [b"w2"])
        out = await asyncio.gather(*(pool.generate([i + 1], KEY) for i in range(6)))
        await pool.stop()
        return engines, pool, out

    engines, pool, out = run(main())
    assert [e.version for e in engines] == [1, 1] and pool.version == 1
    assert {v for _, v in out} == {1}, "after the failed swap every answer comes from the served version"
    assert ("load", 2) in engines[0].log and engines[0].log[-1] != ("load", 2)


def test_one_identity_may_hold_its_share_of_the_queue_and_no_more():
    async def main():
        eng = FakeEngine(delay=0.3)
        pool = _pool([eng], max_queue=8, max_batch=1, max_client_queue=3)
        await pool.start()
        busy = asyncio.ensure_future(pool.generate([1], KEY, "alice"))
        await asyncio.sleep(0.05)  # the engine is drawing it; the queue is empty
        mine = [asyncio.ensure_future(pool.generate([i], KEY, "alice")) for i in range(2, 5)]
        await asyncio.sleep(0)
        refused = None
        try:
            await pool.generate([5], KEY, "alice")
        except QueueShare as err:
            refused = err
        bob = [asyncio.ensure_future(pool.generate([i], KEY, "bob")) for i in range(6, 9)]
        anon = [asyncio.ensure_future(pool.generate([i], KEY)) for i in range(9, 11)]  # no keys: no share
        await asyncio.sleep(0)
        queued = len(pool.queue)
        mine[0].cancel()  # a prompt its caller gave up on is not held against her
        await asyncio.sleep(0)
        again = asyncio.ensure_future(pool.generate([12], KEY, "alice"))
        await asyncio.gather(busy, *mine[1:], *bob, *anon, again)
        await pool.stop()
        return refused, queued

    refused, queued = run(main())
    assert refused is not None and "serve.limits.max_queued_prompts=3" in str(refused)
    assert queued == 3 + 3 + 2, "another identity (and the anonymous one) still got into the queue"
