"""Two Ray nodes on this machine: `cluster=ray` joins them, and trainer ranks land where they are told.

A real head (`ray start --head`) and a second node (`ray start --address=...
--resources='{"node2": 1}'`) run on two loopback addresses (127.0.0.2 and
127.0.0.3: Ray turns 127.0.0.1 into the machine's network address, and two
nodes need two addresses), with their own ports, temp dir and auth token, so
they can neither meet nor stop anyone else's Ray. Teardown kills exactly the
processes this test started (their process groups, then anything left that
names the temp dir); it never runs `ray stop`, which would stop every Ray
on the machine.

The driver runs in a subprocess (this file, run as a script) so that the
test process keeps no Ray state and no auth token of its own:
1. a DeepSpeed `PolicyWorker` placed by `WorkerGroup(resources={"node2": 0.1})`
   runs on node 2 and does a real setup, forward pass and update;
2. the `Runtime` that `ttrl-train cluster=ray` builds joins the cluster with
   `+cluster.trainer_resources.node2=0.1` (and `cluster.placement=split`), its
   trainer ranks land on node 2,
   one real training step runs, and the shutdown only disconnects: the
   cluster is still up afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ttrl.distributed.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
HEAD_IP, NODE2_IP = "127.0.0.2", "127.0.0.3"
RAY = str(Path(sys.executable).parent / "ray")


def _node_ports() -> list[str]:
    # Every port a node opens, chosen free, so that two nodes on one machine
    # (and anybody else's Ray) never collide on a default port.
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]


def _kill_tree(procs: list[subprocess.Popen], tmp: str) -> list[str]:
    """Stop the `ray start --block` process groups we started, then anything still naming our temp dir."""
    import psutil

    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 8
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    time.sleep(1)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if tmp in " ".join(proc.info["cmdline"] or []):
                left.append(" ".join(proc.info["cmdline"])[:120])
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return left


@pytest.fixture
def two_nodes():
    for ip in (HEAD_IP, NODE2_IP):
        try:
            free_port(ip)
        except OSError:
            pytest.skip(f"cannot bind {ip} (loopback addresses beyond 127.0.0.1 are needed for two Ray nodes)")
    tmp = tempfile.mkdtemp(prefix="ttrl2n-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = Path(tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    port = free_port(HEAD_IP)
    address = f"{HEAD_IP}:{port}"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", f"--node-ip-address={HEAD_IP}", "--num-cpus=2",
             "--include-dashboard=false", "--dashboard-port", str(free_port()), "--ray-client-server-port",
             str(free_port()), "--disable-usage-stats", f"--temp-dir={tmp}", *_node_ports()],
            env=env, start_new_session=True, stdout=open(f"{tmp}/head.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while True:  # the head's GCS is up when its port takes connections
            assert procs[0].poll() is None, Path(f"{tmp}/head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Ray head did not come up within 60 s"
            with socket.socket() as s:
                if s.connect_ex((HEAD_IP, port)) == 0:
                    break
            time.sleep(0.3)
        procs.append(subprocess.Popen(
            [RAY, "start", "--block", f"--address={address}", f"--node-ip-address={NODE2_IP}", "--num-cpus=2",
             '--resources={"node2": 1}', "--disable-usage-stats", *_node_ports()],
            env=env, start_new_session=True, stdout=open(f"{tmp}/node2.log", "w"), stderr=subprocess.STDOUT))
        yield {"address": address, "env": env, "tmp": tmp, "procs": procs}
    finally:
        left = _kill_tree(procs, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes outlived their `ray start`: {left}"


def test_trainer_ranks_run_on_the_node_they_are_pinned_to(two_nodes):
    out = Path(two_nodes["tmp"]) / "result.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tests.integration.test_two_nodes", two_nodes["address"], str(out)],
                          cwd=ROOT, env=two_nodes["env"], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])
    res = json.loads(out.read_text())
    nodes = res["nodes"]  # node id -> IP
    assert sorted(nodes.values()) == [HEAD_IP, NODE2_IP], nodes
    node2 = next(n for n, ip in nodes.items() if ip == NODE2_IP)

    # 1. WorkerGroup(resources={"node2": 0.1}): the rank ran on node 2, and for real.
    probe = res["probe"]
    assert probe["node"] == node2
    assert probe["logp_len"] == probe["completion_len"] and all(v < 0 for v in probe["logp"])
    assert probe["grad_norm"] > 0 and probe["fingerprint_after"] != pytest.approx(probe["fingerprint_before"])

    # 2. The Runtime of `cluster=ray`: joined (does not own the cluster), trainer ranks on node 2.
    rt = res["runtime"]
    assert rt["owns_ray"] is False
    assert rt["policy_nodes"] == [node2, node2]  # experiment=debug: 2 ZeRO-3 ranks
    assert set(rt["engine_nodes"]) <= set(nodes)
    row = rt["row"]
    assert row["train/grad_norm"] > 0 and row["rollout/logprob_diff"] < 1e-3
    assert rt["after_shutdown_initialized"] is False  # the run disconnected ...
    assert sorted(rt["nodes_after"]) == sorted(nodes)  # ... and the cluster lives on
    print(f"two-node driver: {time.monotonic() - t0:.0f}s", [x for x in proc.stderr.splitlines() if "[driver" in x])


# ── the driver (run as `python -m tests.integration.test_two_nodes ADDRESS OUT`) ──────────────
def _node_of(actor) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def _driver(address: str, out: Path) -> None:
    import ray

    from tests.conftest import compose_config
    from ttrl.distributed.group import WorkerGroup
    from ttrl.distributed.ray_setup import actor_env
    from ttrl.distributed.runtime import Runtime
    from ttrl.parts import build_parts
    from ttrl.step import StepContext, StepOptions, step
    from ttrl.trainer.batch import pack_batch
    from ttrl.trainer.options import UpdateOptions
    from ttrl.trainer.worker import PolicyWorker

    # split: each trainer rank and engine has its own slot, so the ranks can go to node 2 (2 CPUs)
    # and the engine wherever there is room.
    cfg = compose_config("experiment=debug", "cluster=ray", f"cluster.address={address}", "cluster.placement=split",
                         "+cluster.trainer_resources.node2=0.1", "cluster.placement_timeout_s=120", "reward=custom",
                         "reward.fn=tests.integration.rewards_fake:digit_share", "logger.progress=false",
                         "trainer.lr=1e-3", "trainer.lr_schedule=constant")
    setup = build_parts(cfg)
    res: dict = {}

    t0 = time.monotonic()

    def say(what: str) -> None:
        print(f"[driver {time.monotonic() - t0:5.1f}s] {what}", file=sys.stderr, flush=True)

    # This driver runs on the head (no raylet answers at 127.0.0.1: say which node is ours).
    # The fixture only waits for the head's GCS port; on a loaded box the head's raylet can
    # register a little later, and ray.init then finds no node at HEAD_IP: try again briefly.
    deadline = time.monotonic() + 90
    while True:
        try:
            ray.init(address=address, runtime_env={"env_vars": actor_env("cpu")}, log_to_driver=False,
                     _node_ip_address=HEAD_IP)
            break
        except ConnectionError:
            ray.shutdown()
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    deadline = time.monotonic() + 240
    while not ray.cluster_resources().get("node2"):
        assert time.monotonic() < deadline, "node 2 did not join within 240 s (a loaded 2-core box has taken over 90)"
        time.sleep(0.5)
    res["nodes"] = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    say(f"connected, nodes {sorted(res['nodes'].values())}")

    # 1. One DeepSpeed policy rank, pinned by a custom resource.
    spec = dict(device="cpu", dtype="float32", seed=0, zero_stage=3, micro_batch_size=1, grad_accum=1,
                betas=[0.9, 0.999], weight_decay=0.0, grad_clip=1.0, offload=False, lr=1e-3, critic_lr=1e-5,
                lr_schedule="constant", warmup_steps=0, min_lr_ratio=0.0, gradient_checkpointing=False,
                with_ref=False)
    group = WorkerGroup(PolicyWorker, 1, spec, name="probe", resources={"node2": 0.1})
    say("probe rank placed")
    group.setup(setup.model_path, 1)
    say("probe rank set up")
    tok = setup.tokenizer
    prompt = tok("12+34+56=", add_special_tokens=False)["input_ids"]
    completion = tok("\\boxed{102}", add_special_tokens=False)["input_ids"]
    batch = pack_batch([prompt], [completion], pad_id=tok.pad_token_id)
    logp = group.call("compute_logprobs", batch, 1.0)[0][0]  # [R]
    before = group.call("fingerprint")[0]
    import torch

    batch["old_logp"] = logp[None].clone()
    batch["advantages"] = torch.ones_like(batch["old_logp"])
    batch["returns"] = torch.zeros_like(batch["old_logp"])
    opts = dataclasses.replace(UpdateOptions.from_config(cfg, overlap=False), kl_coef=0.0)
    stats = group.call("train_step", batch, float(batch["response_mask"].sum()), opts)[0]
    res["probe"] = {"node": _node_of(group.actors[0]), "logp": logp.tolist(), "logp_len": len(logp),
                    "completion_len": len(completion), "grad_norm": stats["grad_norm"],
                    "fingerprint_before": before, "fingerprint_after": group.call("fingerprint")[0]}
    group.kill()
    ray.shutdown()
    say("probe done")

    # 2. What `ttrl-train cluster=ray +cluster.trainer_resources.node2=0.1` builds and runs.
    rt = Runtime(cfg, setup.model_path, total_opt_steps=1)
    try:
        ctx = StepContext(rt, setup.reward, tok, StepOptions.from_config(cfg), __import__("random").Random(0))
        say("runtime up")
        row = step(ctx, setup.prompts[:cfg.data.prompts_per_step])
        say("step done")
        res["runtime"] = {"owns_ray": rt.owns_ray, "policy_nodes": [_node_of(a) for a in rt.policy.actors],
                          "engine_nodes": [_node_of(e) for e in rt.engines],
                          "row": {k: v for k, v in row.items() if isinstance(v, (int, float))}}
    finally:
        rt.shutdown()
    res["runtime"]["after_shutdown_initialized"] = ray.is_initialized()
    ray.init(address=address, log_to_driver=False, _node_ip_address=HEAD_IP)
    res["runtime"]["nodes_after"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.shutdown()
    out.write_text(json.dumps(res))


if __name__ == "__main__":
    _driver(sys.argv[1], Path(sys.argv[2]))
