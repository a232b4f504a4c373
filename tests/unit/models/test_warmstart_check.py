"""The warm start's check that it reached its teacher: held-out sums, the vote tally, when the build stops."""

from __future__ import annotations

import json

import pytest

from ttrl.cli import compose
from ttrl.data.synthetic import arithmetic_problems
from ttrl.models import warmstart
from ttrl.models.warmstart import held_out_sums, tally, warmstart_spec
from ttrl.trainer import precision as trainer_precision
from ttrl.trainer.precision import cpu_has_bf16

# A one-layer model of hidden 64: a build of a few steps takes seconds.
SMALL = ["model.tiny.hidden_size=64", "model.tiny.num_heads=2", "model.tiny.head_dim=32", "model.tiny.num_layers=1",
         "model.tiny.intermediate_size=64", "model.warmstart.batch_size=4", "model.warmstart.warmup_steps=1",
         "model.warmstart.check_prompts=4", "model.warmstart.check_votes=2", "model.warmstart.check_every=2"]


def test_tally_counts_right_samples_and_calls_a_tie_wrong():
    assert tally(["97", "97", "87", None], "97") == (2, True)
    assert tally(["87", "87", "97", "107"], "97") == (1, False)
    # A tie between the truth and a wrong total is not a right vote: the check must not pass on a coin flip.
    assert tally(["97", "87", "97", "87"], "97") == (2, False)
    assert tally([None, None], "97") == (0, False)
    assert tally(["97"], "97") == (1, True)


def test_held_out_sums_are_the_tests_length_and_never_a_test_problem():
    task = {"terms": 3, "digits": 2, "test_num": 256, "test_seed": 1234}
    test = {p.problem for p in arithmetic_problems(256, 3, 2, 1234)}
    held = held_out_sums(300, task, test)
    assert len(held) == 300 == len({p.problem for p in held})
    assert not {p.problem for p in held} & test
    assert all(p.problem.count("+") == 2 and p.problem.endswith("=") for p in held)
    assert all(int(p.answer) == sum(map(int, p.problem[:-1].split("+"))) for p in held)
    assert [p.problem for p in held_out_sums(300, task, test)] == [p.problem for p in held]


def test_recipes_without_the_new_keys_keep_their_spec():
    # experiment=demo_hard's warm starts are the ones its archived runs were measured on: the keys
    # added after recipe version 4 must not enter its spec (its cache name) unless set.
    hard = compose(["experiment=demo_hard"])
    recipe = warmstart_spec(hard.model, hard.data.synthetic)["recipe"]
    assert "check" not in recipe and "optimizer" not in recipe
    assert recipe["version"] == 4 and recipe["batch_size"] == 256
    demo = compose(["experiment=demo"])
    assert warmstart_spec(demo.model, demo.data.synthetic)["recipe"] != recipe
    # The demo's own recipe names its check, made where its schedule ends.
    r = warmstart_spec(demo.model, demo.data.synthetic)["recipe"]
    assert r["check"]["target_maj"] == 0.95 and r["check"]["from"] == r["steps"] and r["check"]["extend_steps"] == 300
    assert r["optimizer"] == "muon"
    # The second hard bed pins the recipe it was measured on (AdamW, batches of 256): the same spec, key for
    # key, as before the demo's build moved to Muon.
    c = compose(["experiment=demo_hard_4terms"])
    old = warmstart_spec(c.model, c.data.synthetic)["recipe"]
    assert "optimizer" not in old and old["batch_size"] == 256 and old["lr"] == 2e-3 and old["warmup_steps"] == 25
    # The serve tests' build: the demo's Muon recipe cut short, checked for a majority right on half the sums
    # (not for the teacher), on a smaller check than the demo's.
    from tests.integration.serving import WARM

    c = compose(["experiment=demo", *WARM])
    serve = warmstart_spec(c.model, c.data.synthetic)["recipe"]
    assert serve["optimizer"] == "muon" and serve["batch_size"] == 128 and serve["steps"] == 320
    assert "precision" not in serve  # fp32 on every CPU: the model the serve tests' gate figures were measured on
    assert serve["check"] == {"target_maj": 0.5, "every": 40, "from": 320, "prompts": 64, "votes": 16,
                              "extend_steps": 200}
    # A weak build asked for on purpose (target_maj=null) turns the check off and is checked by no one.
    weak = compose(["experiment=demo", "model.warmstart.steps=300", "model.warmstart.target_maj=null"])
    assert "check" not in warmstart_spec(weak.model, weak.data.synthetic)["recipe"]


def _build(tmp_path, monkeypatch, *overrides):
    monkeypatch.setenv("TTRL_CACHE", str(tmp_path))
    cfg = compose(["experiment=demo", *SMALL, *overrides])
    path = warmstart.ensure_warmstart(cfg.model, cfg.data.synthetic, progress=False)
    return json.loads((path / "ttrl_spec.json").read_text())["train_stats"]


def test_build_stops_at_the_first_check_that_reaches_the_target(tmp_path, monkeypatch):
    import ttrl.data.synthetic as synthetic

    excluded = []
    real = synthetic.easy_stream
    monkeypatch.setattr(synthetic, "easy_stream", lambda *a, **k: excluded.append(k["exclude"]) or real(*a, **k))
    stats = _build(tmp_path, monkeypatch, "model.warmstart.steps=10", "model.warmstart.target_maj=0.0",
                   "model.warmstart.check_from=4")
    assert stats["steps_run"] == 4 and stats["reached_teacher_at"] == 4
    assert [c["step"] for c in stats["checks"]] == [4]
    # The check's prompts are kept out of the training stream, as the test split is.
    assert len(excluded) == 1 and len(excluded[0]) == 256 + 4


def test_build_short_of_its_teacher_goes_on_for_extend_steps_then_keeps_the_model_and_says_so(
        tmp_path, monkeypatch, capsys):
    stats = _build(tmp_path, monkeypatch, "model.warmstart.steps=3", "model.warmstart.target_maj=1.0",
                   "model.warmstart.check_from=2", "model.warmstart.extend_steps=3")
    assert stats["steps_run"] == 6 and stats["reached_teacher_at"] is None
    # Checked every 2 steps from step 2, and at the schedule's end (step 3).
    assert [c["step"] for c in stats["checks"]] == [2, 3, 4, 6]
    assert all(0 <= c["maj"] <= 1 and 0 <= c["pass1"] <= 1 for c in stats["checks"])
    err = capsys.readouterr().err
    assert "after 6 steps" in err and "extend_steps=3" in err and "model.warmstart.target_maj=1.0" in err


def test_without_check_from_the_first_check_is_where_the_schedule_ends(tmp_path, monkeypatch):
    stats = _build(tmp_path, monkeypatch, "model.warmstart.steps=3", "model.warmstart.target_maj=1.0",
                   "model.warmstart.extend_steps=4")
    assert [c["step"] for c in stats["checks"]] == [3, 4, 6, 7]
    assert stats["steps_run"] == 7


def test_build_without_a_target_runs_exactly_its_steps(tmp_path, monkeypatch):
    stats = _build(tmp_path, monkeypatch, "model.warmstart.steps=3", "model.warmstart.target_maj=null")
    assert stats["steps_run"] == 3 and "checks" not in stats


@pytest.mark.parametrize(("override", "words"), [
    ("model.warmstart.extend_steps=-1", "model.warmstart.extend_steps=-1 must be at least 0"),
    ("model.warmstart.check_from=0", "model.warmstart.check_from=0 must be at least 1, or null"),
    ("model.warmstart.target_maj=1.5", "model.warmstart.target_maj=1.5 must lie in [0, 1]"),
    ("model.warmstart.optimizer=sgd", "model.warmstart.optimizer"),
])
def test_bad_check_settings_name_their_key(override, words):
    from ttrl.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(["experiment=demo", override])
    assert words in str(err.value)


_BUILD = """
import sys
from ttrl.cli import compose
from ttrl.models import warmstart
cfg = compose(["experiment=demo", *sys.argv[1:]])
print("built at", warmstart.ensure_warmstart(cfg.model, cfg.data.synthetic, progress=True), flush=True)
"""


def _final_dir(tmp_path, monkeypatch, overrides):
    from ttrl.models.tiny import spec_hash

    monkeypatch.setenv("TTRL_CACHE", str(tmp_path))
    cfg = compose(["experiment=demo", *overrides])
    return tmp_path / "models" / f"tiny-arith-{spec_hash(warmstart_spec(cfg.model, cfg.data.synthetic))}"


@pytest.mark.parametrize("other_finishes", [True, False])
def test_a_second_process_waits_for_the_build_in_progress_and_uses_its_model(tmp_path, monkeypatch, other_finishes):
    # The test holds the build lock, as a first builder would; a second process asking for the same warm
    # start must wait, then take the first one's model (other_finishes) or build it itself (the first died).
    import fcntl
    import os
    import subprocess
    import sys
    import time

    overrides = [*SMALL, "model.warmstart.steps=2", "model.warmstart.target_maj=null"]
    final = _final_dir(tmp_path, monkeypatch, overrides)
    final.parent.mkdir(parents=True)
    lock = final.with_name(f".{final.name}.lock").open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "TTRL_CACHE": str(tmp_path)})
    try:
        assert "another process is building the warm start" in proc.stdout.readline()
        time.sleep(0.5)
        assert proc.poll() is None, "it went on without the lock"
        if other_finishes:
            final.mkdir()
            (final / "ttrl_spec.json").write_text('{"made by": "the first builder"}')
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"built at {final}" in out
    spec = json.loads((final / "ttrl_spec.json").read_text())
    assert ("made by" in spec) == other_finishes and ("train_stats" in spec) != other_finishes


def test_bf16_is_read_from_the_cpus_flags():
    line = "flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {} popcnt\n"
    assert cpu_has_bf16("processor\t: 0\n" + line.format("avx512_bf16"))
    assert cpu_has_bf16(line.format("amx_bf16 amx_tile"))
    # AVX-512 alone (Skylake, Zen 3 has none): bf16 would be emulated, slower than fp32.
    assert not cpu_has_bf16(line.format("avx512_vnni"))
    assert not cpu_has_bf16("processor\t: 0\nmodel name\t: something\n")


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_recipe_is_the_fp32_one_on_a_cpu_without_bf16(monkeypatch, native):
    monkeypatch.setattr(trainer_precision, "cpu_has_bf16", lambda: native)
    demo = compose(["experiment=demo"])
    assert demo.model.warmstart.precision == "bf16"  # the demo asks for it
    fp32 = compose(["experiment=demo", "model.warmstart.precision=fp32"])
    asked, plain = (warmstart_spec(c.model, c.data.synthetic) for c in (demo, fp32))
    assert "precision" not in plain["recipe"]
    if native:
        assert asked["recipe"]["precision"] == "bf16" and asked != plain
    else:  # the same recipe, key for key: the same cache name and the same weights as before bf16 existed
        assert asked == plain


def test_a_bf16_build_trains_in_bf16_and_saves_fp32_weights(tmp_path, monkeypatch):
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): builds are fp32")
    import torch
    from safetensors.torch import load_file

    seen = []
    real = warmstart._batch_loss

    def spy(model, *args, **kwargs):  # what each step's forward and backward ran under
        seen.append((precision, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                     model.config._attn_implementation))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(warmstart, "_batch_loss", spy)
    weights = {}
    for precision in ("bf16", "fp32"):
        monkeypatch.setenv("TTRL_CACHE", str(tmp_path / precision))
        cfg = compose(["experiment=demo", *SMALL, "model.warmstart.steps=3", "model.warmstart.target_maj=null",
                       f"model.warmstart.precision={precision}"])
        path = warmstart.ensure_warmstart(cfg.model, cfg.data.synthetic, progress=False)
        weights[precision] = load_file(path / "model.safetensors")
        # The saved model is an ordinary fp32 one: the trainer and vLLM load it as they load the fp32 build's.
        config = json.loads((path / "config.json").read_text())
        assert "eager" not in json.dumps(config) and config.get("torch_dtype", config.get("dtype")) == "float32"
    assert all(t.dtype == torch.float32 for t in weights["bf16"].values())
    assert seen == [("bf16", torch.bfloat16, "eager")] * 3 + [("fp32", False, "sdpa")] * 3
    # Three steps from the same init and data: the bf16 matmuls' rounding shows in the trained matrices.
    assert any(not torch.equal(weights["fp32"][k], weights["bf16"][k]) for k in weights["fp32"])
