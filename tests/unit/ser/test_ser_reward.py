"""The reward model itself on CPU (plain torch, no Ray or DeepSpeed): the score is read at
the last real token whatever the padding, agrees with Hugging Face's own pooling, and
survives a save/load; and the `reward_model` reward's checks, shapes and label-freedom."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model_in_own_cache
from ttrl.rewards import REWARDS, build_reward, compute_rewards
from ttrl.rewards.reward_model import check_reward_model_dir
from ttrl.trainer.reward_model import (
    RemoteRewardModel,
    RewardModelScorer,
    RMFormat,
    build_rm_model,
    encode,
    pack_sequences,
    sequence_scores,
)
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    yield from tiny_model_in_own_cache(tmp_path_factory, num_layers=1)


@pytest.fixture(scope="module")
def rm(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    model = build_rm_model(str(tiny_dir), torch.float32, tok.pad_token_id).eval()
    torch.nn.init.normal_(model.hf.score.weight, std=1.0)  # a head that is not ~0
    return model, tok


TEXTS = ["12+34+56=\\boxed{102}", "1+2=\\boxed{3}", "99+1=\\boxed{100}<|endoftext|>"]


def _scores(model, tok, texts, left=False):
    ids = encode(tok, texts, RMFormat(template="{q}{a}"))
    batch = pack_sequences(ids, tok.pad_token_id)
    if left:  # the same rows, padding moved to the front
        T = batch["input_ids"].shape[1]
        for k in batch:
            batch[k] = torch.stack([torch.roll(row, T - int(m.sum())) for row, m in
                                    zip(batch[k], batch["attention_mask"])])
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return sequence_scores(model.hf, batch["input_ids"], batch["attention_mask"], batch["position_ids"])


def test_score_ignores_padding_side_and_batch_company(rm):
    model, tok = rm
    together = _scores(model, tok, TEXTS)
    alone = torch.cat([_scores(model, tok, [t]) for t in TEXTS])
    left = _scores(model, tok, TEXTS, left=True)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(left, together, atol=1e-5)
    assert together.shape == (3,) and together.std() > 0


def test_score_is_read_at_the_last_real_token_even_when_it_is_the_pad_token(rm):
    model, tok = rm
    # The third text ends in EOS, which is also the pad token: HF's own pooling (rightmost
    # non-pad id) would read the token before it; ours reads the EOS itself.
    ids = encode(tok, TEXTS[:2], RMFormat(template="{q}{a}"))
    batch = pack_sequences(ids, tok.pad_token_id)
    with torch.no_grad():
        hf = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert torch.allclose(hf, _scores(model, tok, TEXTS[:2]), atol=1e-5)  # agrees where HF can tell
    eos = encode(tok, [TEXTS[2]], RMFormat(template="{q}{a}"))[0]
    assert eos[-1] == tok.pad_token_id
    without = _scores(model, tok, [TEXTS[2][: -len("<|endoftext|>")]])
    assert not torch.allclose(_scores(model, tok, [TEXTS[2]]), without)


def test_encode_truncates_from_the_left_and_appends_eos(rm):
    _, tok = rm
    fmt = RMFormat(template="Q: {q} A: {a}", max_length=6, append_eos=True)
    ids = encode(tok, [fmt.text("1+1=", "\\boxed{2}")], fmt)[0]
    assert len(ids) == 6 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "ed{2}"  # the beginning went


def test_lora_model_starts_as_the_plain_one_and_merges(rm, tiny_dir):
    model, tok = rm
    torch.manual_seed(0)
    lora = build_rm_model(str(tiny_dir), torch.float32, tok.pad_token_id,
                          {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    merged = lora.hf.merge_and_unload()
    assert type(merged).__name__ == "Qwen2ForSequenceClassification"


def test_saved_dir_scores_the_same_through_the_scorer(rm, tmp_path):
    model, tok = rm
    model.hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    RMFormat(template="{q}{a}", transform="raw").save(tmp_path)
    scorer = RewardModelScorer(str(tmp_path), device="cpu")
    got = scorer.score(["12+34+56=", "1+2="], ["\\boxed{102}", "\\boxed{3}"])
    assert got == pytest.approx(_scores(model, tok, TEXTS[:2]).tolist(), abs=1e-5)
    probs = scorer.score(["1+2="], ["\\boxed{3}"], transform="sigmoid")
    assert probs[0] == pytest.approx(torch.sigmoid(torch.tensor(got[1])).item(), abs=1e-6)


# ── the reward ────────────────────────────────────────────────────────────
def test_reward_model_is_registered_and_label_free():
    assert "reward_model" in REWARDS.names()
    assert REWARDS.get("reward_model").needs_ground_truth is False


@pytest.mark.parametrize("path, message", [
    (None, "needs reward.path"),
    ("ser", "SER stage"),
    ("/nonexistent/rm", "no reward model there"),
])
def test_reward_model_dir_is_checked_before_anything_starts(path, message):
    with pytest.raises(ValueError, match=message):
        check_reward_model_dir(path)


class FakeScorer:
    """A `RewardScorer` without a model: the score is the completion's length."""

    def __init__(self):
        self.seen, self.closed = [], 0

    def score(self, prompts, completions):
        self.seen.append((prompts, completions))
        return [float(len(c)) for c in completions]

    def close(self):
        self.closed += 1


def test_reward_model_shapes_and_scrubbed_prompts():
    scorer = FakeScorer()
    reward = build_reward("reward_model", scorer=scorer)
    groups = [Group(Prompt("a", "1+1=", answer="2"), [], [Sample(text="x"), Sample(text="yy")]),
              Group(Prompt("b", "2+2=", answer="4"), [], [Sample(text="zzz")])]
    out = compute_rewards(reward, groups)
    assert out.rewards == [[1.0, 2.0], [3.0]] and out.votes is None
    assert scorer.seen == [(["1+1=", "1+1=", "2+2="], ["x", "yy", "zzz"])]
    reward.close()
    assert scorer.closed == 1


def test_a_scorer_that_drops_scores_is_an_error():
    class Short(FakeScorer):
        def score(self, prompts, completions):
            return [0.0]

    reward = build_reward("reward_model", scorer=Short())
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        compute_rewards(reward, [Group(Prompt("a", "q"), [], [Sample(text="x"), Sample(text="y")])])


def test_the_remote_scorer_checks_its_transform_and_starts_nothing_when_built(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    scorer = RemoteRewardModel(check_reward_model_dir(str(tmp_path)))
    assert scorer.path == str(tmp_path) and scorer._actor is None
    scorer.close()  # nothing started, nothing to stop
    with pytest.raises(ValueError, match="transform"):
        RemoteRewardModel(str(tmp_path), transform="softmax")


# ── the likelihood head (ser.rm.head=likelihood) ───────────────────────────
def _manual_loglik(lm, tok, prompt: str, response: str) -> float:
    """The response's summed log-prob, computed the long way: one text, one forward, token by token."""
    n_prompt = len(tok(prompt)["input_ids"])
    ids = tok(prompt + response, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm(ids).logits[0].float(), -1)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(n_prompt, ids.shape[1]))


def test_encode_one_finds_where_the_response_starts_and_keeps_it_through_truncation(tiny_dir):
    from transformers import AutoTokenizer

    from ttrl.trainer.reward_model import encode_one

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    fmt = RMFormat(template="Q: {q} A: {a}")
    ids, start = encode_one(tok, "1+2=", "\\boxed{3}", fmt)
    assert ids == tok("Q: 1+2= A: \\boxed{3}")["input_ids"]
    assert tok.decode(ids[start:]) == "\\boxed{3}"
    # Cut from the front: the response keeps its tokens and its start moves with the cut.
    short = RMFormat(template="Q: {q} A: {a}", max_length=12)
    ids2, start2 = encode_one(tok, "1+2=", "\\boxed{3}", short)
    assert len(ids2) == 12 and ids2 == ids[-12:] and tok.decode(ids2[start2:]) == "\\boxed{3}"
    # A response longer than max_length: all of what is left is response.
    ids3, start3 = encode_one(tok, "1+2=", "x" * 40, short)
    assert start3 == 0 and len(ids3) == 12


def test_likelihood_score_is_the_scaled_response_loglik_whatever_the_batch(tiny_dir):
    from transformers import AutoTokenizer

    from ttrl.trainer.reward_model import encode_one

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = build_rm_model(str(tiny_dir), torch.float32, tok.pad_token_id, head="likelihood", scale=2.0,
                           bias=-1.0).eval()
    fmt = RMFormat(template="{q}{a}")
    rows = [("12+34=", "12+34=46 \\boxed{46}"), ("1+2=", "\\boxed{3}"), ("99+1=", "\\boxed{100}")]
    enc = [encode_one(tok, p, r, fmt) for p, r in rows]
    batch = pack_sequences([i for i, _ in enc], tok.pad_token_id, starts=[s for _, s in enc])
    with torch.no_grad():
        got = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["response_mask"])
    want = torch.tensor([2.0 * _manual_loglik(model.hf, tok, p, r) - 1.0 for p, r in rows])
    assert torch.allclose(got, want, atol=1e-4)
    # No weights beyond the LM's own; without a response mask it refuses rather than guess.
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"hf"}
    with pytest.raises(ValueError, match="response_mask"):
        model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])


@pytest.mark.parametrize("good, bad, spread", [(-2.0, -6.0, 2.5), (-0.5, -0.9, 0.3)])
def test_a_judge_s_medians_land_on_the_target_probability(good, bad, spread):
    import math

    from ttrl.trainer.reward_model import head_calibration

    scale, bias = head_calibration(good, bad, spread, target=0.9)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert sig(scale * good + bias) == pytest.approx(0.9) and sig(scale * bad + bias) == pytest.approx(0.1)


def test_a_backbone_that_cannot_judge_gets_unsure_scores_not_saturated_ones():
    import math

    from ttrl.trainer.reward_model import head_calibration

    # Medians 0.01 nats apart in a spread of 2: the spread sets the scale, the medians stay near 0.5.
    scale, bias = head_calibration(-5.0, -5.01, 2.0)
    assert scale == pytest.approx(2 * math.log(9) / 2.0)
    assert abs(scale * -5.0 + bias) < 0.02
    # Bad responses likelier than good ones: still centred, still bounded.
    scale, bias = head_calibration(-6.0, -4.0, 1.0)
    assert scale == pytest.approx(2 * math.log(9)) and bias == pytest.approx(5.0 * scale)
    assert head_calibration(-5.0, -5.0, 0.0) == (1.0, 5.0)  # nothing to read a scale from
    with pytest.raises(ValueError, match="target"):
        head_calibration(-1.0, -2.0, 1.0, target=0.4)


def test_a_saved_likelihood_rm_dir_scores_as_the_model_did(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    RMFormat(template="{q}{a}", head="likelihood", head_scale=3.0, head_bias=0.5).save(tmp_path)
    assert RMFormat.load(tmp_path).head == "likelihood"
    scorer = RewardModelScorer(str(tmp_path), device="cpu", batch_size=2)
    prompts, responses = ["12+34=", "1+2=", "7+8="], ["\\boxed{46}", "\\boxed{3}", "7+8=15 \\boxed{15}"]
    got = scorer.score(prompts, responses)
    want = [3.0 * _manual_loglik(lm, tok, p, r) + 0.5 for p, r in zip(prompts, responses)]
    assert got == pytest.approx(want, abs=1e-4)
    sig = scorer.score(prompts, responses, transform="sigmoid")
    assert sig == pytest.approx([float(torch.sigmoid(torch.tensor(x))) for x in want], abs=1e-6)


def test_the_rm_backbone_is_the_policy_model_or_the_same_warm_start_run_shorter():
    from tests.conftest import compose_config
    from ttrl.ser.loop import _rm_backbone

    cfg = compose_config("experiment=ser_demo")
    assert _rm_backbone(cfg) is cfg.model
    weak = _rm_backbone(compose_config("experiment=ser_demo", "ser.rm.warmstart_steps=150"))
    assert weak.warmstart.steps == 150 and cfg.model.warmstart.steps == 600
    # Weak on purpose: the build's check that it reached its teacher would extend it.
    assert weak.warmstart.target_maj is None and cfg.model.warmstart.target_maj == 0.95
    assert weak.tiny == cfg.model.tiny and weak.warmstart.seed == cfg.model.warmstart.seed


# ── the defences against reward hacking (reward.normalize/clip/length_penalty/ensemble) ──
class FakeTableScorer(FakeScorer):
    """A fake RM whose score is looked up by completion text."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def score(self, prompts, completions):
        self.seen.append((prompts, completions))
        return [self.table[c] for c in completions]


def _groups(*texts_per_prompt, logprobs=None):
    return [Group(Prompt(f"p{i}", "1+1="), [], [Sample(text=t, logprobs=list(logprobs[t]) if logprobs else [])
                                                for t in texts])
            for i, texts in enumerate(texts_per_prompt)]


def test_normalize_whitens_by_the_running_moments_of_every_score_so_far():
    reward = build_reward("reward_model", scorer=FakeTableScorer({"a": 1.0, "b": 3.0, "c": 5.0, "d": 7.0}),
                          normalize=True)
    first = compute_rewards(reward, _groups(["a", "b"])).rewards
    # Two scores so far: mean 2, sample std sqrt(2).
    assert first == [[pytest.approx(-1 / 2 ** 0.5), pytest.approx(1 / 2 ** 0.5)]]
    second = compute_rewards(reward, _groups(["c", "d"])).rewards
    # Four scores so far: mean 4, std sqrt(20/3); the earlier scores count.
    sd = (20 / 3) ** 0.5
    assert second == [[pytest.approx(1 / sd), pytest.approx(3 / sd)]]


def test_clip_bounds_what_one_sample_can_earn_and_length_penalty_charges_per_token():
    table = {"short": 10.0, "long": -10.0, "mid": 0.5}
    lp = {"short": [-0.1] * 3, "long": [-0.1] * 40, "mid": [-0.1] * 10}
    reward = build_reward("reward_model", scorer=FakeTableScorer(table), clip=2.0, length_penalty=0.05)
    assert reward.needs == frozenset({"logprobs"})  # the token counts: the rollout's own
    out = compute_rewards(reward, _groups(["short", "long", "mid"], logprobs=lp))
    assert out.rewards == [[pytest.approx(2.0 - 0.15), pytest.approx(-2.0 - 2.0), pytest.approx(0.5 - 0.5)]]
    # Off by default: the raw score, and nothing extra asked of the step.
    plain = build_reward("reward_model", scorer=FakeTableScorer(table))
    assert plain.needs == frozenset()
    assert compute_rewards(plain, _groups(["short", "mid"])).rewards == [[10.0, 0.5]]


@pytest.mark.parametrize("reduce, want", [("mean", [2.0, 0.0]), ("min", [1.0, -4.0])])
def test_an_ensemble_of_reward_models_scores_by_mean_or_min(reduce, want):
    from ttrl.rewards.reward_model import EnsembleScorer

    a, b = FakeTableScorer({"x": 1.0, "y": 4.0}), FakeTableScorer({"x": 3.0, "y": -4.0})
    ens = EnsembleScorer([a, b], reduce)
    assert ens.score(["q", "q"], ["x", "y"]) == want
    ens.close()
    assert a.closed == b.closed == 1
    with pytest.raises(ValueError, match="reduce"):
        EnsembleScorer([a], "max")


def test_an_ensemble_member_that_drops_scores_is_named():
    from ttrl.rewards.reward_model import EnsembleScorer

    class Short(FakeScorer):
        def score(self, prompts, completions):
            return [0.0]

    with pytest.raises(ValueError, match="reward model 1 of the ensemble returned 1 scores for 2"):
        EnsembleScorer([FakeScorer(), Short()]).score(["q", "q"], ["a", "b"])


def test_the_run_builds_the_defences_from_the_reward_section(tmp_path):
    from tests.conftest import compose_config
    from ttrl.parts import reward_options
    from ttrl.rewards.reward_model import EnsembleScorer

    for d in ("rm1", "rm2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    cfg = compose_config("experiment=ser_demo", "ser.enabled=false", f"reward.path={tmp_path / 'rm1'}",
                         f"reward.ensemble=[{tmp_path / 'rm2'}]", "reward.ensemble_reduce=min", "reward.normalize=true",
                         "reward.clip=3", "reward.length_penalty=0.01")
    opts = reward_options(cfg)
    assert isinstance(opts["scorer"], EnsembleScorer) and opts["scorer"].reduce == "min"
    assert [s.path for s in opts["scorer"].scorers] == [str(tmp_path / "rm1"), str(tmp_path / "rm2")]
    assert (opts["normalize"], opts["clip"], opts["length_penalty"]) == (True, 3.0, 0.01)
