"""The tiny model the project builds itself: cached by content, byte-level tokenizer, vLLM-safe shape."""

from __future__ import annotations

import pytest

from ttrl.models.tiny import byte_symbols, cache_root, ensure_tiny_model, spec_hash, tiny_spec


def test_spec_rejects_head_dim_vllm_cannot_run():
    with pytest.raises(ValueError, match="head_dim >= 32"):
        tiny_spec(32, 1, 2, 16, 64, 0)
    with pytest.raises(ValueError, match="must equal num_heads"):
        tiny_spec(100, 1, 2, 64, 64, 0)


def test_byte_symbols_are_distinct_and_printable():
    syms = byte_symbols()
    assert len(syms) == 256 == len(set(syms))
    assert all(s.isprintable() and not s.isspace() for s in syms)
    assert syms[ord("7")] == "7"


def test_build_is_cached_by_content_and_tokenizer_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("TTRL_CACHE", str(tmp_path))
    spec = tiny_spec(64, 1, 1, 64, 128, seed=3, max_position_embeddings=256)
    path = ensure_tiny_model(spec)
    assert path.name.endswith(spec_hash(spec))
    assert ensure_tiny_model(spec) == path  # second call reuses the build
    assert not list(path.parent.glob("*.tmp-*")), "no half-written build left behind"
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = "12+34=\\boxed{46}\n ü"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode())  # one token per byte
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.head_dim == 64 and cfg.num_hidden_layers == 1
    other = tiny_spec(64, 1, 1, 64, 128, seed=4, max_position_embeddings=256)
    assert spec_hash(other) != spec_hash(spec)


def test_warmstart_build_takes_fresh_process_threads_and_gives_them_back(tmp_path, monkeypatch):
    # vLLM, once used in a process, leaves torch at one thread; a warm start built after it
    # (the serve tests' fixture) ran on one core. The build uses a fresh process's count.
    import torch

    from ttrl.cli import compose
    from ttrl.models import warmstart

    monkeypatch.setenv("TTRL_CACHE", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what a fresh process would take, whatever the box
    cfg = compose(["experiment=demo", "model.tiny.hidden_size=64", "model.tiny.num_heads=2",
                       "model.tiny.head_dim=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
                       "model.warmstart.steps=2", "model.warmstart.batch_size=4", "model.warmstart.warmup_steps=1"])
    seen = []
    monkeypatch.setattr(warmstart, "_train", lambda *a: seen.append(torch.get_num_threads()) or {"train_s": 0.0})
    before = torch.get_num_threads()
    torch._C.set_num_threads(1)
    try:
        path = warmstart.ensure_warmstart(cfg.model, cfg.data.synthetic, progress=False)
        assert seen == [2]
        assert torch.get_num_threads() == 1, "the caller's thread count is given back"
    finally:
        torch._C.set_num_threads(before)
    assert '"threads": 2' in (path / "ttrl_spec.json").read_text()


def test_the_cache_is_an_absolute_dir_and_an_empty_ttrl_cache_is_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = tmp_path / "home" / ".cache" / "ttrl"
    monkeypatch.delenv("TTRL_CACHE", raising=False)
    assert cache_root() == default
    # A script's `TTRL_CACHE=${X:-}` with X unset: not the current directory (models/ in a checkout).
    for empty in ("", "  "):
        monkeypatch.setenv("TTRL_CACHE", empty)
        assert cache_root() == default
    monkeypatch.setenv("TTRL_CACHE", "rel/cache")
    assert cache_root() == tmp_path / "rel" / "cache" and cache_root().is_absolute()
    monkeypatch.setenv("TTRL_CACHE", "~/c")
    assert cache_root() == tmp_path / "home" / "c"
    # The actors get the driver's reading of it, so a relative one names the same dir in every actor's cwd.
    from ttrl.distributed.ray_setup import actor_env

    monkeypatch.setenv("TTRL_CACHE", "rel/cache")
    assert actor_env("cpu")["TTRL_CACHE"] == str(tmp_path / "rel" / "cache")
    monkeypatch.delenv("TTRL_CACHE")
    assert "TTRL_CACHE" not in actor_env("cpu")


def test_weights_fingerprint_names_the_weights_not_the_dir(tmp_path):
    from ttrl.models.resolve import weights_fingerprint

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, data in ((a, b"\x00\x01weights"), (b, b"\x00\x01weights"), (c, b"\x00\x02weights")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(data)
        (d / "config.json").write_text("{}")
    fa = weights_fingerprint(str(a))
    assert fa is not None and len(fa) == 16
    assert weights_fingerprint(str(b)) == fa  # same bytes elsewhere: same weights
    assert weights_fingerprint(str(c)) != fa  # one byte apart: other weights
    (b / "config.json").write_text('{"other": 1}')
    assert weights_fingerprint(str(b)) == fa  # the config is not the weights
    (b / "model.safetensors").rename(b / "model-00001.safetensors")
    assert weights_fingerprint(str(b)) != fa  # another file layout is another checkpoint
    (tmp_path / "empty").mkdir()
    assert weights_fingerprint(str(tmp_path / "empty")) is None
    assert weights_fingerprint("Qwen/Qwen2.5-0.5B") is None  # a hub id: nothing local to hash
    # A big checkpoint is sampled (names, sizes, first and last MiB), not read whole: a change at either end shows.
    big = tmp_path / "big"
    big.mkdir()
    data = bytearray(3 << 20)
    (big / "model.safetensors").write_bytes(bytes(data))
    sampled = weights_fingerprint(str(big), whole_up_to=1 << 20)
    assert sampled is not None and sampled != weights_fingerprint(str(big))
    data[-1] = 1
    (big / "model.safetensors").write_bytes(bytes(data))
    assert weights_fingerprint(str(big), whole_up_to=1 << 20) != sampled
