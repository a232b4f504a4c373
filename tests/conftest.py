"""Shared test plumbing: paths, config composition, markers by folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Quiet, offline, CPU: what every test expects.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The files that take longest (minutes each on a 2-core AMD EPYC, measured with two
# workers), longest first. Under pytest-xdist (`make test` runs two workers, a file
# each at a time) they are handed out first, so the many short files fill the end
# of the run instead of one long file running alone after the rest are done
# (the Makefile's --no-loadscope-reorder: xdist would hand out the files with the most tests first).
LONGEST_FIRST = [f"integration/{name}.py" for name in (
    "test_serve", "test_bench", "test_reliability", "test_lora", "test_serve_hostile", "test_serve_tenant_learning",
    "test_ser", "test_engine")]


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts or "e2e" in parts:
            item.add_marker(pytest.mark.integration)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # A stable sort: within a file, and among the rest, the collection order stands.
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get("/".join(Path(str(item.fspath)).parts[-2:]), len(rank)))


_SESSION: list[pytest.Session] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own exit status as soon as everything is reported, skipping interpreter teardown.

    Why: CI once saw every test pass (1561 passed) and then a segmentation fault
    while the interpreter tore down the native libraries this process had
    loaded (torch, gloo, vLLM, Ray's driver), turning a green run red with exit
    139. Nothing the tests assert happens after this point. Ray is shut down
    first so no local cluster outlives the run. TTRL_TEST_FULL_TEARDOWN=1 keeps
    the normal teardown (to hunt the crash itself).
    """
    if not _SESSION or os.environ.get("TTRL_TEST_FULL_TEARDOWN") == "1":
        return
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_SESSION[-1].exitstatus))


def compose_config(*overrides: str):
    """The config `ttrl-train` would build from these overrides, validated."""
    from hydra import compose, initialize_config_dir

    from ttrl.cli import CONF_DIR
    from ttrl.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate(cfg)
    return cfg


def tiny_model_in_own_cache(tmp_path_factory, num_layers: int):
    """Yield a tiny random Qwen2 (hidden 64, one head of 64) built under a TTRL_CACHE of the test module's own,
    restoring the caller's TTRL_CACHE after: a module fixture's model never lands in the user's cache."""
    from ttrl.models.tiny import ensure_tiny_model, tiny_spec

    old = os.environ.get("TTRL_CACHE")
    os.environ["TTRL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield ensure_tiny_model(tiny_spec(64, num_layers, 1, 64, 128, seed=1, max_position_embeddings=256))
    finally:
        if old is None:
            os.environ.pop("TTRL_CACHE")
        else:
            os.environ["TTRL_CACHE"] = old


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"no benchmark data: {SHARED_DATA} is missing (clone with ../shared beside the repo)")
    return SHARED_DATA
