"""`label.extractor` is what a run reads answers with: the step's vote and rewards, and eval's grades.

Its config: an unknown name, and `custom` without its function, fail naming
the key; `custom` threads "custom:<path>" (configured_extractor).

A test-only extractor (`_fake_last_number`: the last number in the text) is
registered for each test and removed after it. The completions below put
one answer in a `\\boxed{}` and another as the last number, so the two
extractors vote for different labels; the config alone picks which one the
run's own path (StepOptions.from_config -> rollout -> compute_rewards, and
ttrl.run.evaluate) uses.
"""

from __future__ import annotations

import random
import re
import sys

import pytest

from tests.conftest import compose_config
from ttrl.config import ConfigError
from ttrl.labeling.extract import EXTRACTORS, configured_extractor
from ttrl.types import Prompt

pytestmark = pytest.mark.unit

FAKE = "_fake_last_number"

# One prompt's samples. boxed reads 1, 1, 2, None (label 1); the last number
# reads 7, 7, 7, 9 (label 7, the ground truth).
TEXTS = ["\\boxed{1} is what I wrote, but 7", "\\boxed{1}, hmm, 7", "\\boxed{2} or 7", "no box: 9"]


def _last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+", text) if isinstance(text, str) else []
    return found[-1] if found else None


@pytest.fixture
def fake_extractor(monkeypatch):
    # monkeypatch takes it out of the registry again when the test ends.
    monkeypatch.setitem(EXTRACTORS._items, FAKE, _last_number)
    yield FAKE
    assert FAKE in EXTRACTORS


class FakeRuntime:
    """The engines' side of the seam: every prompt gets TEXTS as its samples."""

    def _outs(self, prompt_ids, n):
        assert n == len(TEXTS)
        return [[{"text": t, "token_ids": [1, 2], "logprobs": [-0.1, -0.1], "finish_reason": "stop"} for t in TEXTS]
                for _ in prompt_ids]

    def submit_generate(self, prompt_ids, n, temperature, top_p, top_k, max_tokens, seed=None):
        return self._outs(prompt_ids, n)

    def collect(self, handle):
        return handle

    def generate(self, prompt_ids, n, temperature, top_p, top_k, max_tokens, seed=None):
        return self._outs(prompt_ids, n)


def _ctx(*overrides: str):
    from ttrl.parts import reward_options
    from ttrl.rewards import build_reward
    from ttrl.step import StepContext, StepOptions

    cfg = compose_config("experiment=debug", "reward=majority_vote", f"rollout.n_votes={len(TEXTS)}",
                         f"rollout.n_train={len(TEXTS)}", "eval.n_samples=4", "eval.ks=[1]", "eval.greedy=false",
                         *overrides)
    # As ttrl.parts.build_parts builds it.
    reward = build_reward(cfg.reward.name, extractor=configured_extractor(cfg.label), **reward_options(cfg))

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    return cfg, StepContext(FakeRuntime(), reward, tokenizer, StepOptions.from_config(cfg), random.Random(0))


PROMPTS = [Prompt("p0", "1+6=", "7", "1+6=")]


def _vote_and_rewards(ctx):
    """Stages 1-3 of `ttrl.step.step`, as it runs them."""
    from ttrl.rewards import compute_rewards
    from ttrl.step import rollout

    groups = rollout(ctx, PROMPTS)
    out = compute_rewards(ctx.reward, groups)
    return [s.answer for s in groups[0].samples], out.votes[0].label, out.rewards[0]


def test_the_default_extractor_votes_on_the_boxed_answers():
    _, ctx = _ctx()
    assert ctx.opts.extractor == "boxed"
    assert _vote_and_rewards(ctx) == (["1", "1", "2", None], "1", [1.0, 1.0, 0.0, 0.0])


def test_a_configured_extractor_changes_the_steps_vote_and_rewards(fake_extractor):
    _, ctx = _ctx(f"label.extractor={fake_extractor}")
    assert _vote_and_rewards(ctx) == (["7", "7", "7", "9"], "7", [1.0, 1.0, 1.0, 0.0])


def test_a_configured_extractor_changes_what_eval_grades(fake_extractor):
    from ttrl.run import evaluate

    cfg, ctx = _ctx()
    assert evaluate(cfg, ctx, PROMPTS)["eval/pass@1"] == 0.0  # boxed: 1, 1, 2, none; the answer is 7
    cfg, ctx = _ctx(f"label.extractor={fake_extractor}")
    assert evaluate(cfg, ctx, PROMPTS)["eval/pass@1"] == pytest.approx(0.75)


def test_the_choice_extractor_votes_on_letters_through_the_step(monkeypatch):
    # Four completions of a multiple-choice question: C, C, B, and a hedge that states no single letter.
    monkeypatch.setattr(sys.modules[__name__], "TEXTS", ["The answer is (C).", r"\boxed{C}", "Answer: B", "A or B"])
    _, ctx = _ctx("label.extractor=choice")
    assert ctx.opts.extractor == "choice" and ctx.reward.extractor == "choice"
    assert _vote_and_rewards(ctx) == (["C", "C", "B", None], "C", [1.0, 1.0, 0.0, 0.0])


def test_the_number_extractor_grades_eval_numerically(monkeypatch):
    from ttrl.run import evaluate

    monkeypatch.setattr(sys.modules[__name__], "TEXTS", ["so 7.0", "it is 7", "$7$ apples", "1,234"])
    cfg, ctx = _ctx("label.extractor=number")
    assert evaluate(cfg, ctx, PROMPTS)["eval/pass@1"] == pytest.approx(0.75)


# ── its config ─────────────────────────────────────────────────────────────
def test_an_unknown_extractor_is_named_with_the_choices():
    with pytest.raises(ConfigError) as err:
        compose_config("label.extractor=letters")
    message = str(err.value)
    assert message.startswith("label.extractor='letters' is not an answer extractor")
    assert "boxed, choice, custom, number" in message


@pytest.mark.parametrize(("overrides", "words"), [
    (["label.extractor=custom"], ["label.custom_extractor must name a function", "label.extractor=custom"]),
    (["label.extractor=custom", "label.custom_extractor='not a path'"],
     ["label.custom_extractor='not a path' must name a function as 'package.module:function'"]),
    (["label.custom_extractor=my_pkg.answers:read"],
     ["label.custom_extractor is only read by label.extractor=custom, not label.extractor=boxed"]),
])
def test_a_custom_extractor_config_mistake_names_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        compose_config(*overrides)
    for word in words:
        assert word in str(err.value)


def test_a_custom_extractor_config_threads_its_path():
    path = "tests.unit.labeling.test_answer_types:after_hash"
    cfg = compose_config("label.extractor=custom", f"label.custom_extractor={path}")
    assert configured_extractor(cfg.label) == f"custom:{path}"
    # The path is imported when the run is set up, not when the config is validated.
    cfg = compose_config("label.extractor=custom", "label.custom_extractor=no_such_pkg_xyz.answers:read")
    with pytest.raises(ValueError, match="label.custom_extractor='no_such_pkg_xyz.answers:read'"):
        configured_extractor(cfg.label)


def test_the_anchor_votes_are_drawn_afresh_even_when_the_eval_sampled_as_the_votes_do(tmp_path):
    """The guard's consensus signal compares a step's votes with the anchor's: both must be the rollout's own
    draws. Reusing the starting eval's answers shifted the signal by its whole threshold (ttrl.run.start_guard)."""
    from ttrl.data.sampler import PromptSampler
    from ttrl.run import evaluate, start_guard

    cfg, ctx = _ctx("eval.temperature=1.0", "eval.top_p=1.0", "rollout.temperature=1.0", "rollout.top_p=1.0",
                    "rollout.max_new_tokens=24", "safety.anchor_prompts=1")
    generate = ctx.rt.generate
    calls: list[dict] = []

    def counted(*a, **k):
        calls.append(k)
        return generate(*a, **k)

    ctx.rt.generate = counted
    first = evaluate(cfg, ctx, PROMPTS)
    start_guard(cfg, ctx, PROMPTS, tmp_path, 0, first, PromptSampler(1, 1, False, 0), True)
    assert len(calls) == 2, "the eval and the anchor votes each generate"
    assert calls[1]["n"] == cfg.rollout.n_votes and calls[1]["max_tokens"] == 24
    assert ctx.vote_rows == [{"id": "p0", "label": "1", "ratio": 0.5, "margin": 0.25, "classes": 2, "sizes": [2, 1], "n": 4}]
