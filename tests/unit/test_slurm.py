"""SLURM and sweeper presets, checked without a SLURM cluster.

- `cluster=slurm` selects the submitit launcher preset sized from `cluster.*`;
- a real `ttrl-train -m cluster=slurm ...` goes through Hydra's submitit
  launcher up to `sbatch`, which a stub replaces: the sbatch script it wrote
  asks for what the config says, and each job's pickled overrides are there;
- experiments/slurm/ray_multinode.sbatch, with `srun`, `scontrol`, `ray`,
  `python` and `ttrl-train` stubbed, starts the head first, the workers
  against it, waits for all nodes, then runs ttrl-train with cluster=ray;
- the Optuna preset composes when hydra-optuna-sweeper is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _compose(*overrides: str):
    """The config with its `hydra` node (the job's config is validated as ttrl-train would)."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import compose_config
    from ttrl.cli import CONF_DIR

    compose_config(*overrides)  # validate() raises on a bad value
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_cluster_slurm_selects_the_slurm_launcher_sized_from_the_cluster():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from omegaconf import OmegaConf

    cfg = _compose("cluster=slurm", "cluster.gpus_per_node=4", "cluster.cpus_per_node=32",
                   "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # A job is one node running its own local Ray cluster.
    assert cfg.cluster.address is None and launcher.nodes == 1
    resolved = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert resolved["gpus_per_node"] == "${cluster.gpus_per_node}"
    assert cfg.hydra.launcher.gpus_per_node == 4 and cfg.hydra.launcher.cpus_per_task == 32
    assert launcher.partition == "gpu" and launcher.timeout_min > 0
    # Without cluster=slurm, Hydra's basic launcher: jobs one after another here.
    assert _compose().hydra.launcher._target_.endswith("BasicLauncher")


_FAKE_SBATCH = """#!/bin/bash
# A stub sbatch: keep the script, answer like SLURM.
n=$(ls "$FAKE_SLURM_DIR" | grep -c '^sbatch_' || true)
cp "${@: -1}" "$FAKE_SLURM_DIR/sbatch_$n.sh"
echo "Submitted batch job 4242$n"
"""
_SITE = """
# Test only: a SLURM job submitted through submitit "completes" at once, unrun.
import os
if os.environ.get("FAKE_SLURM_DIR"):
    import submitit.slurm.slurm as _slurm
    from hydra.core.utils import JobReturn, JobStatus

    _slurm.SlurmJob.results = lambda self: [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]
"""


def test_a_sweep_on_slurm_submits_one_array_job_asking_for_the_gpus(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    fake_bin, site, got, sweep = tmp_path / "bin", tmp_path / "site", tmp_path / "got", tmp_path / "sweep"
    for d in (fake_bin, site, got):
        d.mkdir()
    (fake_bin / "sbatch").write_text(_FAKE_SBATCH)
    (fake_bin / "srun").write_text("#!/bin/bash\nexec \"$@\"\n")  # submitit only checks that it exists
    for f in fake_bin.iterdir():
        f.chmod(0o755)
    (site / "sitecustomize.py").write_text(_SITE)
    env = {**os.environ, "FAKE_SLURM_DIR": str(got), "PATH": f"{fake_bin}:{os.environ['PATH']}",
           "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [str(BIN / "ttrl-train"), "-m", "cluster=slurm", "experiment=debug", "algorithm=grpo,ppo",
         "cluster.gpus_per_node=4", "cluster.cpus_per_node=16", "hydra.launcher.partition=gpu",
         "hydra.launcher.timeout_min=90", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripts = sorted(got.glob("sbatch_*.sh"))
    assert len(scripts) == 1, "one array job for the whole sweep"
    text = scripts[0].read_text()
    for flag in ["--array=0-1%2", "--gpus-per-node=4", "--cpus-per-task=16", "--nodes=1", "--ntasks-per-node=1",
                 "--partition=gpu", "--time=90", "--job-name=ttrl-debug"]:
        assert f"#SBATCH {flag}\n" in text, (flag, text)
    assert "#SBATCH --signal=USR" in text and "@300" in text
    assert "-m submitit.core._submit" in text
    # Each job's overrides are pickled for the node that will run it.
    import cloudpickle

    jobs = []
    for pkl in sorted((sweep / ".submitit").glob("*/*_submitted.pkl")):
        with pkl.open("rb") as fh:
            delayed = cloudpickle.load(fh)
        jobs.append(list(delayed.args[0]))
    assert len(jobs) == 2
    assert ["algorithm=grpo" in j for j in jobs] == [True, False]
    assert all("cluster=slurm" in j and "experiment=debug" in j for j in jobs)


_NODE = """
import json, os, sys
from pathlib import Path
import cloudpickle

# What submitit does on the node, with ttrl's task replaced by a probe.
os.environ.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="42420", SLURM_ARRAY_JOB_ID="42420", SLURM_PROCID="0",
                  SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1",
                  SLURM_JOB_NODELIST="n1")
out = []
for i, pkl in enumerate(sorted(Path(sys.argv[1]).rglob("*_submitted.pkl"))):
    os.environ["SLURM_ARRAY_TASK_ID"] = str(i)
    with pkl.open("rb") as fh:
        job = cloudpickle.load(fh)

    def probe(cfg):
        from hydra.core.hydra_config import HydraConfig
        from ttrl.metrics.logger import run_identity

        return {**run_identity(cfg), "run_dir": HydraConfig.get().runtime.output_dir,
                "algorithm": cfg.algorithm.name, "address": cfg.cluster.address}

    job.function.task_function = probe
    out.append(job.result().return_value)
print(json.dumps(out))
"""


def test_slurm_jobs_share_the_sweep_group_and_keep_their_run_dirs(tmp_path):
    """The pickled jobs, run later as on the nodes: one W&B group, run dirs under the sweep dir.

    The default sweep dir holds `${now:...}`; a job that starts (or is requeued) an hour
    later must still resolve it to the sweep's time, or its group and run dir would change.
    """
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    fake_bin, site, got = tmp_path / "bin", tmp_path / "site", tmp_path / "got"
    for d in (fake_bin, site, got):
        d.mkdir()
    (fake_bin / "sbatch").write_text(_FAKE_SBATCH)
    (fake_bin / "srun").write_text("#!/bin/bash\nexec \"$@\"\n")
    for f in fake_bin.iterdir():
        f.chmod(0o755)
    (site / "sitecustomize.py").write_text(_SITE)
    env = {**os.environ, "FAKE_SLURM_DIR": str(got), "PATH": f"{fake_bin}:{os.environ['PATH']}",
           "PYTHONPATH": str(site)}
    proc = subprocess.run([str(BIN / "ttrl-train"), "-m", "cluster=slurm", "experiment=debug", "algorithm=grpo,ppo",
                           "logger=wandb"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "debug").iterdir()  # multirun/debug/<time of the sweep>
    env.pop("FAKE_SLURM_DIR")
    node = subprocess.run([sys.executable, "-c", _NODE, str(sweep)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert node.returncode == 0, node.stderr[-3000:]
    import json

    grpo, ppo = json.loads(node.stdout.strip().splitlines()[-1])
    assert grpo["group"] == ppo["group"] == f"debug/{sweep.name}"
    assert grpo["algorithm"] == "grpo" and "algorithm=grpo" in grpo["name"]
    assert ppo["algorithm"] == "ppo" and "algorithm=ppo" in ppo["name"]
    assert Path(grpo["run_dir"]).parent == sweep and Path(grpo["run_dir"]).name.startswith("0_")
    assert Path(ppo["run_dir"]).name.startswith("1_")
    assert grpo["address"] is None  # each job starts its own Ray cluster on its node


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


def test_the_multinode_sbatch_script_starts_head_then_workers_then_the_run(tmp_path):
    script = ROOT / "experiments" / "slurm" / "ray_multinode.sbatch"
    log = tmp_path / "calls.log"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _stub(bin_ / "scontrol", "printf 'gpu-a\\ngpu-b\\ngpu-c\\n'\n")
    # srun: drop srun's own options, run the command here (log it with its target node).
    _stub(bin_ / "srun", """
        node=""
        while [[ "$1" == -* ]]; do
          case "$1" in -w) node="$2"; shift 2;; --overlap) shift;; *) shift;; esac
        done
        if [[ "$1" == hostname ]]; then echo "10.0.0.1 fe80::1"; exit 0; fi
        echo "srun[$node] $*" >> "$CALLS"
        exec "$@"
    """)
    # ray start --block: stay up until killed, like the real one.
    _stub(bin_ / "ray", 'echo "ray $*" >> "$CALLS"; trap "echo ray-stopped >> $CALLS; exit 0" TERM; '
                        'while true; do sleep 0.1; done\n')
    # python wait_for_nodes.py ADDRESS N T: like the real one, return once N nodes have started.
    _stub(bin_ / "python", '''
        echo "python $*" >> "$CALLS"
        for _ in $(seq 200); do
          [ "$(grep -c '^ray start' "$CALLS")" -ge "$3" ] && exit 0
          sleep 0.05
        done
        exit 1
    ''')
    _stub(bin_ / "ttrl-train", 'echo "ttrl-train $*" >> "$CALLS"\n')
    env = {**os.environ, "PATH": f"{bin_}:/usr/bin:/bin", "CALLS": str(log), "SLURM_JOB_NODELIST": "gpu-[a-c]",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "32", "SLURM_JOB_ID": "77",
           "SLURM_SUBMIT_DIR": str(ROOT), "TTRL_VENV": str(tmp_path / "no-venv")}
    proc = subprocess.run(["bash", str(script), "experiment=demo", "algorithm=ppo"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    head = next(c for c in calls if c.startswith("ray start --head"))
    assert head.startswith("ray start --head --block --node-ip-address=10.0.0.1 --port=6379")
    assert "--num-gpus=8" in head and "--num-cpus=32" in head
    assert sorted(c for c in calls if c.startswith("srun[")) == [
        "srun[gpu-a] ray start --head --block --node-ip-address=10.0.0.1 --port=6379 --num-cpus=32 --num-gpus=8 "
        "--disable-usage-stats",
        "srun[gpu-b] ray start --block --address=10.0.0.1:6379 --num-cpus=32 --num-gpus=8 --disable-usage-stats",
        "srun[gpu-c] ray start --block --address=10.0.0.1:6379 --num-cpus=32 --num-gpus=8 --disable-usage-stats",
    ]
    # The head is up before the workers start; all nodes are up before the run.
    waits = [i for i, c in enumerate(calls) if c.startswith("python ")]
    assert [calls[i] for i in waits] == ["python experiments/ray/wait_for_nodes.py 10.0.0.1:6379 1 300",
                                         "python experiments/ray/wait_for_nodes.py 10.0.0.1:6379 3 600"]
    workers = [i for i, c in enumerate(calls) if c.startswith("srun[gpu-b]") or c.startswith("srun[gpu-c]")]
    run = next(i for i, c in enumerate(calls) if c.startswith("ttrl-train "))
    assert waits[0] < min(workers) and max(workers) < run and waits[1] < run
    assert calls[run] == ("ttrl-train cluster=ray cluster.address=10.0.0.1:6379 cluster.nodes=3 "
                          "cluster.gpus_per_node=8 hydra.run.dir=outputs/slurm-77 experiment=demo algorithm=ppo")
    # The Ray processes (the srun steps) are stopped when the run ends.
    assert calls.count("ray-stopped") == 3


def test_optuna_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                        reason="hydra-optuna-sweeper is not installed (pip install hydra-optuna-sweeper)")
    cfg = _compose("hydra/sweeper=optuna_lr_kl", "logger.objective=eval/pass@1")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"trainer.lr", "algorithm.kl_coef"}


def test_optuna_preset_names_valid_keys():
    """Without the plugin: the preset's searched keys exist in the schema and it opens with its command."""
    import yaml

    from ttrl.config import TTRLConfig

    text = (ROOT / "conf" / "hydra" / "sweeper" / "optuna_lr_kl.yaml").read_text()
    assert "pip install hydra-optuna-sweeper" in text and "ttrl-train -m hydra/sweeper=optuna_lr_kl" in text
    preset = yaml.safe_load(text)
    assert preset["defaults"] == ["optuna"]
    for key in preset["params"]:
        node = TTRLConfig()
        for part in key.split("."):
            assert hasattr(node, part), f"{key} is not a config key"
            node = getattr(node, part)
