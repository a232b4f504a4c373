"""`ttrl-serve`'s config: it composes with every group, and a bad value is one sentence naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ttrl.config import ConfigError
from ttrl.serve.config import is_loopback, validate_serve
from ttrl.serve.protocol import Defaults, RequestError, apply_stop, parse_chat, parse_completion, render_chat

ROOT = Path(__file__).resolve().parents[3]


def compose_serve(*overrides: str):
    from hydra import compose, initialize_config_dir

    from ttrl.cli import CONF_DIR
    from ttrl.serve.config import register_serve_configs

    register_serve_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="serve", overrides=list(overrides))


def test_the_serve_config_composes_on_top_of_the_demo():
    cfg = compose_serve("experiment=demo", "serve.votes=8", "serve.port=0")
    validate_serve(cfg)
    assert cfg.serve.host == "127.0.0.1", "loopback by default"
    assert cfg.serve.votes == 8 and cfg.model.name == "tiny-arith" and cfg.rollout.n_votes == 16
    assert cfg.trainer.lr_schedule == "constant"


@pytest.mark.parametrize("override, words", [
    ("serve.votes=0", "serve.votes=0 must be at least 1"),
    ("serve.port=70000", "serve.port=70000"),
    ("serve.votes=65", "serve.votes=65 must be at most 64"),
    ("serve.votes=8 serve.limits.max_samples=4", "serve.votes=8 must be at most 4 (the most a request may ask"),
    ("serve.max_tokens=5000", "serve.max_tokens=5000 must be at least 1 and below model.max_model_len"),
    ("serve.gate.tolerance=-0.1", "serve.gate.tolerance=-0.1"),
    ("serve.gate.min_agreement=0", "serve.gate.min_agreement=0"),
    ("serve.gate.regression_set=/nonexistent.jsonl", "serve.gate.regression_set=/nonexistent.jsonl does not exist"),
    ("serve.learn.steps=0", "serve.learn.steps"),
    ("reward=ground_truth", "reward.name=ground_truth needs ground-truth answers"),
    ("rollout.weight_sync=nccl", "rollout.weight_sync=nccl"),
    ("rollout.weight_sync=ipc", "rollout.weight_sync=ipc"),
])
def test_bad_values_name_their_key(override, words):
    cfg = compose_serve("experiment=demo", *override.split())
    with pytest.raises(ConfigError, match=None) as err:
        validate_serve(cfg)
    assert words in str(err.value)
    assert str(err.value).count(". ") <= 1, "one sentence"


def test_the_command_line_says_one_sentence_and_exits_2():
    res = subprocess.run([sys.executable, "-m", "ttrl.serve", "serve.votez=3"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == "ttrl-serve: config error: serve.votez is not a known key; did you mean serve.votes?"
    res = subprocess.run([sys.executable, "-m", "ttrl.serve", "serve.votes=0"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("ttrl-serve: config error: serve.votes=0")
    assert "ray" not in res.stderr.lower()


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


D = Defaults(temperature=1.0, top_p=1.0, max_tokens=16, votes=1, max_model_len=256)


def test_requests_parse_with_defaults_and_extensions():
    r = parse_completion({"prompt": "1+1=", "votes": 8, "seed": 3, "stop": ["\n"]}, D)
    assert r.prompts == ["1+1="] and r.sampling.votes == 8 and r.sampling.engine_key() == (8, 1.0, 1.0, -1, 16, 3)
    assert parse_completion({"prompt": [1, 2, 3]}, D).prompt_ids == [[1, 2, 3]]
    assert parse_completion({"prompt": "x", "max_completion_tokens": 4}, D).sampling.max_tokens == 4
    msgs, s, model = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2="}]}]}, D)
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}]
    assert model == "m" and s.n == 1
    for bad in ({"prompt": "x", "logprobs": 2}, {"prompt": "x", "best_of": 4}, {"prompt": "x", "presence_penalty": 1},
                {"prompt": "x", "stop": 3}, {"prompt": "x", "temperature": 0, "votes": 4}, {"prompt": [[]]},
                {"prompt": ["a"] * 65}, {"prompt": "x", "seed": 1.5}):
        with pytest.raises(RequestError):
            parse_completion(bad, D)


def test_chat_rendering_and_stop_strings():
    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    plain = OmegaConf.create({"template": "plain", "prompt_template": "Q: {problem}\nA:", "system_prompt": None})
    chat = OmegaConf.create({"template": "chat", "prompt_template": "{problem}", "system_prompt": "Think."})
    msgs = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2="}]
    assert render_chat(msgs, plain, Tok()) == "Q: 2+2=\nA:", "a plain model sees the last user turn"
    assert render_chat(msgs, chat, Tok()) == "system:Think.|user:1+1=|assistant:2|user:2+2=|assistant:"
    assert apply_stop("abc\ndef", ("\n",)) == ("abc", True)
    assert apply_stop("abcdef", ("x", "cd", "b")) == ("a", True)
    assert apply_stop("abc", ()) == ("abc", False)


@pytest.mark.parametrize("override, words", [
    ("serve.host=10.1.2.3", "serve.host=10.1.2.3 is not loopback and there are no API keys"),
    ("serve.admin_token=hunter2-hunter2", "serve.admin_token is refused"),
    ("serve.api_keys_file=alice:a-key-on-the-command-line", "serve.api_keys_file must name a file"),
    ("serve.trusted_raters=[grader]", "serve.trusted_raters names ['grader']"),
    ("serve.limits.max_body_bytes=10", "serve.limits.max_body_bytes=10 must be at least 1024"),
    ("serve.limits.max_in_flight=0", "serve.limits.max_in_flight=0 must be at least 1"),
    ("serve.limits.requests_per_minute=-1", "serve.limits.requests_per_minute=-1"),
    ("serve.limits.body_timeout_s=0", "serve.limits.body_timeout_s=0.0 must be > 0"),
    ("serve.limits.max_queued_prompts=0", "serve.limits.max_queued_prompts=0 must be at least 1"),
    ("serve.learn.feedback_quorum=0", "serve.learn.feedback_quorum=0"),
    ("serve.learn.max_client_share=0", "serve.learn.max_client_share=0"),
    ("serve.gate.min_askers=0", "serve.gate.min_askers=0"),
    ("serve.gate.rotate_share=1", "serve.gate.rotate_share=1"),
    ("serve.cors_origins=[evil]", "serve.cors_origins entry 'evil'"),
])
def test_access_settings_name_their_key(override, words):
    cfg = compose_serve("experiment=demo", override)
    with pytest.raises(ConfigError) as err:
        validate_serve(cfg)
    assert words in str(err.value)
    assert "a-key-on-the-command-line" not in str(err.value), "a key pasted as a path is never echoed"


def test_keys_hosts_and_single_user(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("alice:alice-key-0123456789\ngrader:grader-key-012345678\n")
    validate_serve(compose_serve("serve.host=0.0.0.0", f"serve.api_keys_file={keys}", "serve.allowed_hosts=[llm.lab]",
                                 "serve.trusted_raters=[grader]"))
    with pytest.raises(ConfigError, match="serve.allowed_hosts must list"):
        validate_serve(compose_serve("serve.host=0.0.0.0", f"serve.api_keys_file={keys}"))
    with pytest.raises(ConfigError, match="serve.single_user=true is for one person"):
        validate_serve(compose_serve("serve.single_user=true", f"serve.api_keys_file={keys}"))
    validate_serve(compose_serve("serve.host=10.1.2.3", "serve.allow_unauthenticated=true"))
    validate_serve(compose_serve("serve.single_user=true"))
    monkeypatch.setenv("TTRL_API_KEYS_FILE", str(keys))
    validate_serve(compose_serve("serve.host=10.1.2.3", "serve.trusted_raters=[grader]"))
    keys.write_text("alice:short\n")
    with pytest.raises(ConfigError, match=r"\$TTRL_API_KEYS_FILE: .* line 1"):
        validate_serve(compose_serve())


def test_a_secret_on_the_command_line_is_refused_before_anything_is_written(tmp_path):
    serve_dir = tmp_path / "serve"
    for arg in ("serve.admin_token=hunter2-hunter2", "serve.api_keys_file=alice:alice-key-0123456789"):
        res = subprocess.run([sys.executable, "-m", "ttrl.serve", arg, f"serve.dir={serve_dir}"], capture_output=True,
                             text=True, cwd=ROOT, timeout=120)
        assert res.returncode == 2 and "refused" in res.stderr, res.stderr
        assert "hunter2" not in res.stderr and "alice-key" not in res.stderr
        assert not serve_dir.exists(), "nothing was written (Hydra's overrides.yaml would hold the secret)"
