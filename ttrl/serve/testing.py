"""Stand-ins for the Ray engine actors and the tokenizer (unit tests run the server without Ray),
and a deliberately harmful reward (the integration test shows the gate rejecting what it teaches).

`FakeEngine` behaves like a Ray actor of `VLLMEngine` as far as the server
can tell: `engine.method.remote(...)` returns an awaitable, and calls run
one at a time in the order they were made. Its answers depend on the
weights version it holds, so a test can see which version answered.
With `tenant_slots` it also takes `generate_tenants` calls and keeps that
many tenant adapters "resident" in least-recently-used order, counting
loads and unloads as a real engine reports them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeDeath(RuntimeError):
    """What a dead actor's call raises (RayActorError in the real server)."""


def boxed(answer: str, logprobs=(-0.5, -0.5, -0.5)) -> dict:
    return {"text": f"The answer is \\boxed{{{answer}}}", "token_ids": [7] * len(logprobs),
            "logprobs": list(logprobs), "finish_reason": "stop"}


class FakeEngine:
    def __init__(self, answer: Callable[[list[int], int, int], dict] | None = None, delay: float = 0.01,
                 refuse: Callable[[list[int]], bool] | None = None, fail_load: Callable[[int], bool] | None = None,
                 tenant_slots: int = 0):
        # answer(prompt_ids, version, sample_index) -> one engine sample dict
        self.answer = answer or (lambda ids, version, j: boxed(f"v{version}"))
        self.delay = delay
        # refuse(prompt_ids): a prompt the engine rejects (its whole call fails, as vLLM's generate does);
        # fail_load(version): a version this engine cannot load (a mismatched checkpoint).
        self.refuse = refuse or (lambda ids: False)
        self.fail_load = fail_load or (lambda version: False)
        self.version = 0
        self.log: list[tuple] = []  # ("generate", n_prompts, version, keys) / ("load", version)
        self.dead = False
        self._lock: asyncio.Lock | None = None
        self.generate = _Method(self._generate)
        self.generate_each = _Method(self._generate_each)
        self.load_weights = _Method(self._load)
        self.info = _Method(self._info)
        self.generate_tenants = _Method(self._generate_tenants)
        self.tenant_slots = tenant_slots
        self.resident: list[int] = []  # tenant adapter ids, least recently used first
        self.loads = self.unloads = 0

    def _l(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _generate(self, prompts, n, temperature, top_p, top_k, max_tokens, seed=None):
        return await self._generate_each(prompts, [(n, temperature, top_p, top_k, max_tokens, seed)] * len(prompts))

    async def _generate_each(self, prompts, keys):
        async with self._l():  # one call at a time, in call order, like a Ray actor
            if self.dead:
                raise FakeDeath("actor died")
            await asyncio.sleep(self.delay)
            if any(self.refuse(p) for p in prompts):
                raise ValueError("the engine refused a prompt")
            self.log.append(("generate", len(prompts), self.version, list(keys)))
            return [[self.answer(p, self.version, j) for j in range(key[0])] for p, key in zip(prompts, keys)]

    async def _generate_tenants(self, prompts, keys, adapters):
        distinct = {a[1] for a in adapters if a is not None}
        if len(distinct) > self.tenant_slots:
            raise ValueError(f"{len(distinct)} tenants in one call, {self.tenant_slots} slots")
        loads = unloads = 0
        for a in adapters:
            if a is None:
                continue
            if a[1] in self.resident:
                self.resident.remove(a[1])
            else:
                loads += 1
                if len(self.resident) >= self.tenant_slots:
                    self.resident.pop(0)
                    unloads += 1
            self.resident.append(a[1])
        outs = await self._generate_each(prompts, keys)
        self.log[-1] = (*self.log[-1], [a[0] if a else None for a in adapters])
        self.loads, self.unloads = self.loads + loads, self.unloads + unloads
        return {"outputs": outs, "loads": loads, "unloads": unloads, "resident": list(self.resident)}

    async def _load(self, blobs, version):
        async with self._l():
            await asyncio.sleep(self.delay)
            if self.fail_load(version):
                raise ValueError(f"cannot load v{version}")
            self.version = version
            self.log.append(("load", version))
            return {"load_s": self.delay, "bytes": 0.0}

    async def _info(self):
        if self.dead:
            raise FakeDeath("still restarting")
        return {"weights_version": self.version, "startup_s": 0.0, "pid": 0}


class FakeTokenizer:
    """Characters as token ids (1-based), enough for prompt lengths and decoding."""

    pad_token_id = 0
    eos_token = "<eos>"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) + 1 for c in text]}

    def decode(self, ids) -> str:
        return "".join(chr(i - 1) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def contrarian_reward(prompts, completions, answers, prompt_ids, **kwargs) -> list[float]:
    """TTRL's reward inverted: 1 for a sample that does NOT agree with its prompt's majority answer.

    A deliberately harmful update for testing the safety gate
    (`reward=custom reward.fn=ttrl.serve.testing:contrarian_reward`): where the
    majority is mostly right, it teaches the model to give up the right
    answer. Flat lists over samples, TRL-style (see ttrl/rewards/custom.py).
    """
    from ttrl.labeling.grade import is_equivalent
    from ttrl.labeling.vote import majority_vote

    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(i)
    rewards = [0.0] * len(answers)
    for idx in groups.values():
        label = majority_vote([answers[i] for i in idx]).label
        for i in idx:
            a = answers[i]
            agrees = a is not None and label is not None and is_equivalent(a, label)
            rewards[i] = 0.0 if agrees else 1.0
    return rewards
