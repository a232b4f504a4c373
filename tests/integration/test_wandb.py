"""W&B for real, offline: what the loggers write is read back from the run's `.wandb` file.

No network: `logger.wandb.mode=offline` writes the run under
`<run dir>/wandb/offline-run-*/run-*.wandb` (what `wandb sync` would upload);
`read_wandb_run` parses it (LevelDB log records of W&B's protobufs), so the
tests see exactly the config, the metrics and the tables W&B would show.
The whole-run path (a real `ttrl-train -m` sweep with W&B) is in
test_sweep_compare.py.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import compose_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

wandb = pytest.importorskip("wandb")


def _cfg(*overrides: str):
    return compose_config("experiment=debug", "logger=wandb", "logger.wandb.mode=offline", *overrides)


SAMPLE = {"prompt_id": "7", "prompt": "12+30=", "completion": "so \\boxed{42}", "answer": "42",
          "pseudo_label": "42", "majority_ratio": 0.75, "votes": "42: 6, 41: 2", "reward": 1.0,
          "ground_truth": "42"}


def test_offline_run_holds_config_metrics_and_samples(tmp_path):
    from ttrl.metrics.logger import build_loggers, read_wandb_run

    cfg = _cfg("algorithm=ppo", "logger.wandb.tags=[paper]", "logger.wandb.notes=first try")
    run_dir = tmp_path / "run"
    log = build_loggers(cfg, run_dir)
    log.log({"step": 1, "reward/mean": 0.25, "label/accuracy": 0.5, "train/kl": float("nan"),
             "event/collapse": "majority ratio 1.0"})
    log.log_samples(1, [SAMPLE, {**SAMPLE, "completion": "\\boxed{41}", "answer": "41", "reward": 0.0}])
    log.log({"step": 2, "reward/mean": 0.5, "label/accuracy": 0.75})
    log.log({"step": 3, "event/rollback_to": "checkpoints/step_0", "event/skipped_update": "non-finite loss"})
    log.close()

    ident = json.loads((run_dir / "wandb_run.json").read_text())
    got = read_wandb_run(run_dir)
    # The run: named after the experiment (no Hydra job here, so no overrides), no group outside a sweep.
    assert got["run"]["id"] == ident["id"]
    assert got["run"]["project"] == "ttrl" and got["run"]["name"] == "debug" and not got["run"]["group"]
    assert got["run"]["tags"] == ["paper", "debug", "ppo", "majority_vote"]
    assert got["run"]["notes"] == "first try"
    # The resolved config, as uploaded.
    c = got["config"]
    assert c["algorithm"]["name"] == "ppo" and c["algorithm"]["use_critic"] is True
    assert c["trainer"]["total_steps"] == 2 and c["experiment"] == "debug"
    assert c["run"]["dir"] == str(run_dir)
    # Metrics against our step; NaN stays NaN; text events are kept.
    metrics = [h for h in got["history"] if "reward/mean" in h]
    # Safety events page the user: one W&B alert each, titled with the step.
    assert [(a["title"], a["text"], a["level"]) for a in got["alerts"]] == [
        ("ttrl: self-training collapse at step 1", "majority ratio 1.0", "WARN"),
        ("ttrl: rolled back at step 3", "checkpoints/step_0", "WARN"),
        ("ttrl: update skipped at step 3", "non-finite loss", "WARN")]
    assert [(h["step"], h["reward/mean"], h["label/accuracy"]) for h in metrics] == [(1, 0.25, 0.5), (2, 0.5, 0.75)]
    assert math.isnan(float(metrics[0]["train/kl"]))
    assert metrics[0]["event/collapse"] == "majority ratio 1.0"
    assert got["summary"]["reward/mean"] == 0.5
    # The sample table: a W&B table of 2 rows at step 1, and its file in the offline run.
    table = next(h for h in got["history"] if "samples/_type" in h)
    assert table["step"] == 1 and table["samples/nrows"] == 2 and table["samples/ncols"] == 10
    table_file = next((run_dir / "wandb").rglob(table["samples/path"].split("/")[-1]))
    data = json.loads(table_file.read_text())
    assert data["columns"][:4] == ["step", "prompt_id", "prompt", "completion"]
    assert data["data"][1][3] == "\\boxed{41}"
    # And the same rows in samples.jsonl; the metrics in metrics.jsonl.
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["answer"], s["reward"]) for s in samples] == [(1, "42", 1.0), (1, "41", 0.0)]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["train/kl"] is None


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    from ttrl.metrics.logger import build_loggers, read_wandb_run

    cfg = _cfg()
    run_dir = tmp_path / "run"
    log = build_loggers(cfg, run_dir)
    for step in (1, 2, 3):
        log.log({"step": step, "reward/mean": step / 10})
    log.log_samples(3, [SAMPLE])
    log.close()
    # Resume from a checkpoint of step 2: steps >= 3 are dropped locally and logged again.
    log = build_loggers(cfg, run_dir)
    log.truncate_from(3)
    log.log({"step": 3, "reward/mean": 0.33})
    log.close()
    files = sorted((run_dir / "wandb").rglob("*.wandb"))
    assert len(files) == 2
    first, second = (read_wandb_run(f) for f in files)
    assert first["run"]["id"] == second["run"]["id"]  # `wandb sync` appends to one run
    assert [h["reward/mean"] for h in second["history"] if "reward/mean" in h] == [0.33]
    assert [json.loads(x)["reward/mean"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        0.1, 0.2, 0.33]
    assert not (run_dir / "samples.jsonl").read_text().strip()  # the step-3 table went with step 3


def test_disabled_mode_writes_jsonl_only(tmp_path):
    from ttrl.metrics.logger import JsonlLogger, build_loggers

    log = build_loggers(_cfg("logger.wandb.mode=disabled"), tmp_path / "run")
    assert [type(s) for s in log.sinks] == [JsonlLogger]
    log.log({"step": 1, "reward/mean": 0.1})
    log.close()
    assert not (tmp_path / "run" / "wandb").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_sweep_jobs_share_a_group_and_are_named_by_their_overrides(tmp_path):
    """Inside a Hydra multirun job: the group comes from the sweep dir, the name from the job's overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from ttrl.cli import CONF_DIR
    from ttrl.config import register_configs
    from ttrl.metrics.logger import run_identity

    register_configs()  # the schema conf/config.yaml extends (so this test also runs alone)

    def job(overrides: list[str], **wandb_keys):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True,
                          overrides=[*(["experiment=debug"] if not any(o.startswith("experiment=")
                                                                        for o in overrides) else []),
                                     "logger=wandb", *overrides,
                                     *[f"logger.wandb.{k}={v}" for k, v in wandb_keys.items()]])
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path / "multirun" / "2026-01-02_03-04-05")
            cfg.hydra.job.override_dirname = ",".join(o for o in overrides)
        HydraConfig.instance().set_config(cfg)
        try:
            return run_identity(cfg)
        finally:
            HydraConfig.instance().cfg = None

    a = job(["algorithm=grpo", "seed=1"])
    b = job(["algorithm=ppo", "seed=1"])
    assert a["group"] == b["group"] == "debug/2026-01-02_03-04-05"
    assert a["name"] == "debug/algorithm=grpo,seed=1" and b["name"] == "debug/algorithm=ppo,seed=1"
    assert "ppo" in b["tags"]
    # One job type per arm: algorithm and reward, and "ser+" when the run trains its own RM first.
    assert (a["job_type"], b["job_type"]) == ("grpo/majority_vote", "ppo/majority_vote")
    s = job(["experiment=debug_ser"])
    assert s["job_type"] == "ser+ppo/reward_model"
    # An explicit group, name and job type win.
    c = job(["algorithm=ppo"], group="ablation", name="mine", job_type="ppo-vs-rm")
    assert (c["group"], c["name"], c["job_type"]) == ("ablation", "mine", "ppo-vs-rm")


def test_sample_rows_show_the_vote_beside_each_completion():
    from ttrl.labeling.vote import majority_vote
    from ttrl.metrics.logger import sample_rows
    from ttrl.types import Group, Prompt, Sample

    answers = ["42", "42", None, "41", "42"]
    groups = [Group(Prompt(str(i), f"problem {i}", "42", f"problem {i}"), [1, 2],
                    [Sample(text=f"... \\boxed{{{a}}}" if a else "no idea", answer=a) for a in answers])
              for i in range(3)]
    votes = [majority_vote(g.answers()) for g in groups]
    rewards = [[1.0, 1.0, 0.0, 0.0, 1.0]] * 3
    rows = sample_rows(groups, votes, rewards, max_prompts=2, max_samples=4)
    assert len(rows) == 2 * 4
    assert rows[0] == {"prompt_id": "0", "prompt": "problem 0", "completion": "... \\boxed{42}", "answer": "42",
                       "pseudo_label": "42", "majority_ratio": 0.6, "votes": "42: 3, 41: 1, (none): 1",
                       "reward": 1.0, "ground_truth": "42"}
    assert [r["answer"] for r in rows[:4]] == ["42", "42", None, "41"]
    assert [r["reward"] for r in rows[:4]] == [1.0, 1.0, 0.0, 0.0]
    assert {r["prompt_id"] for r in rows} == {"0", "1"}


def test_online_without_an_account_says_what_to_do(tmp_path, monkeypatch):
    from ttrl.metrics.logger import WandbSetupError, build_loggers

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(WandbSetupError, match=r"logger.wandb.mode=online: .*API key.*logger.wandb.mode=offline"):
        build_loggers(_cfg("logger.wandb.mode=online"), tmp_path / "run")
