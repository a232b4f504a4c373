"""`ttrl-compare` on hand-made run dirs: labels, table, seeds, torn lines, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ttrl.compare import main
from ttrl.report.runs import CompareError, expand_run_dirs, load_run, run_labels
from ttrl.report.side_by_side import compare


def _config(algorithm: str = "grpo", seed: int = 0, **extra) -> dict:
    advantage = {"grpo": "grpo", "ppo": "gae"}[algorithm]
    cfg = {
        "seed": seed, "experiment": "debug",
        "algorithm": {"name": algorithm, "advantage": advantage, "use_critic": algorithm == "ppo"},
        "trainer": {"lr": 1e-4, "resume": "auto"},
        "logger": {"wandb": {"mode": "offline"}},
        "hydra": {"run": {"dir": f"/tmp/{algorithm}{seed}"}},
    }
    for dotted, value in extra.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def _run(root: Path, name: str, cfg: dict, rows: list[dict], tail: str = "") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return d


def _rows(pass1: list[float], label_acc: float = 0.5) -> list[dict]:
    return [{"step": i + 1, "train/pass@1": p, "label/accuracy": label_acc, "reward/mean": p / 2,
             "timing/step": 2.0, "rollout/tokens_per_s": 100.0} for i, p in enumerate(pass1)]


def test_labels_name_only_what_differs():
    labels = run_labels([_config("grpo"), _config("ppo")])
    # algorithm.advantage and use_critic follow from algorithm.name: not shown.
    assert labels == ["algorithm=grpo", "algorithm=ppo"]
    # hydra.*, logger.* and trainer.resume differ without saying anything about the run.
    a, b = _config("grpo"), _config("grpo", hydra__run__dir="/elsewhere", trainer__resume="none")
    assert run_labels([a, b]) == ["(identical configs)", "(identical configs)"]
    assert run_labels([_config(seed=0), _config(seed=1)]) == ["seed=0", "seed=1"]
    assert run_labels([_config(trainer__lr=1e-4), _config(trainer__lr=1e-3)]) == [
        "trainer.lr=0.0001", "trainer.lr=0.001"]


def test_table_plots_and_json(tmp_path):
    grpo = _run(tmp_path, "grpo", _config("grpo"), _rows([0.1, 0.3, 0.2]))
    ppo = _run(tmp_path, "ppo", _config("ppo"), _rows([0.2, 0.4]))
    out = tmp_path / "cmp"
    md, pngs = compare([grpo, ppo], out)
    text = md.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| algorithm=")]
    assert len(lines) == 2
    g, p = (dict(zip(["run", "steps", "final", "best"], [c.strip() for c in line.split("|")[1:5]]))
            for line in lines)
    assert g == {"run": "algorithm=grpo", "steps": "3", "final": "0.200", "best": "0.300"}
    assert p == {"run": "algorithm=ppo", "steps": "2", "final": "0.400", "best": "0.400"}
    assert f"`{grpo}`" in lines[0]
    assert "Over seeds" not in text  # no two runs differ only by seed
    names = {x.name for x in pngs}
    assert {"compare_train_pass@1.png".replace("@", "at"), "compare_label_accuracy.png",
            "compare_reward_mean.png"} <= names
    assert all(x.stat().st_size > 1000 for x in pngs)
    # Metrics that no run logged get no plot.
    assert "compare_eval_passat1.png" not in names
    data = json.loads((out / "comparison.json").read_text())
    assert [d["label"] for d in data] == ["algorithm=grpo", "algorithm=ppo"]
    assert data[0]["train_pass1"] == [0.2, 0.3] and data[0]["eval_pass1"] == [None, None]


def test_seeds_are_summarised_together(tmp_path):
    dirs = [_run(tmp_path, f"{a}{s}", _config(a, seed=s), _rows([0.1 * (s + 1)]))
            for a in ("grpo", "ppo") for s in (0, 1)]
    text = compare(dirs, tmp_path / "cmp")[0].read_text()
    assert "| algorithm=grpo seed=0 |" in text
    seeds = text.split("## Over seeds")[1]
    row = next(line for line in seeds.splitlines() if line.startswith("| algorithm=grpo"))
    # mean 0.15, sample std of (0.1, 0.2) = 0.0707
    assert "| 0,1 |" in row and "0.150 ± 0.071" in row


def test_a_sweep_dir_stands_for_its_jobs(tmp_path):
    sweep = tmp_path / "multirun"
    for i, a in enumerate(["grpo", "ppo", "grpo"]):
        _run(sweep, f"{i}_algorithm={a},seed={i}", _config(a, seed=i), _rows([0.1]))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / ".submitit").mkdir()
    dirs = expand_run_dirs([sweep])
    assert [d.name.split("_")[0] for d in dirs] == ["0", "1", "2"]
    text = compare([sweep], tmp_path / "cmp")[0].read_text()
    assert "# ttrl-compare: 3 runs" in text


def test_identical_configs_get_their_dir_names(tmp_path):
    a = _run(tmp_path, "first", _config(), _rows([0.1]))
    b = _run(tmp_path, "second", _config(), _rows([0.2]))
    text = compare([a, b], tmp_path / "cmp")[0].read_text()
    assert "| (identical configs) [first] |" in text and "| (identical configs) [second] |" in text


def test_a_torn_last_line_is_tolerated_but_not_a_torn_middle(tmp_path):
    ok = _run(tmp_path, "killed", _config(), _rows([0.1, 0.2]), tail='{"step": 3, "train/pa')
    assert [r["step"] for r in load_run(ok)["rows"]] == [1, 2]
    bad = tmp_path / "damaged"
    bad.mkdir()
    (bad / "config.yaml").write_text(yaml.safe_dump(_config()))
    (bad / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    with pytest.raises(CompareError, match=r"metrics.jsonl:2: not valid JSON"):
        load_run(bad)


def test_clear_errors_for_what_is_not_a_run_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match="no config.yaml, so not a ttrl run dir"):
        load_run(tmp_path / "empty")
    with pytest.raises(CompareError, match="no such directory"):
        load_run(tmp_path / "missing")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CompareError, match="no metrics.jsonl"):
        load_run(half)
    # The command line: one sentence, exit status 2, no traceback.
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "cmp")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ttrl-compare: ") and "not a ttrl run dir" in err and "Traceback" not in err


def test_cli_prints_the_table(tmp_path, capsys):
    a = _run(tmp_path, "a", _config("grpo"), _rows([0.1]))
    b = _run(tmp_path, "b", _config("ppo"), _rows([0.2]))
    main([str(a), str(b), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr()
    assert "| algorithm=grpo |" in out.out and "| algorithm=ppo |" in out.out
    assert "plots in" in out.err
