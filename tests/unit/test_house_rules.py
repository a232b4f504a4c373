"""House rules that keep the project easy to change, checked rather than hoped for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PURE = ["ttrl.labeling.extract", "ttrl.labeling.grade", "ttrl.labeling.vote", "ttrl.rewards", "ttrl.algos",
        "ttrl.data.loader", "ttrl.data.synthetic", "ttrl.data.sampler", "ttrl.eval.metrics", "ttrl.config",
        "ttrl.metrics.safety", "ttrl.types"]


def test_pure_core_imports_no_engine():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PURE)
            + "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'vllm', 'deepspeed'})\n"
              "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the pure core pulled in {out.stdout.strip()}"


def test_every_module_opens_with_a_docstring():
    missing = []
    for path in sorted((ROOT / "ttrl").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if path.name != "__init__.py" and not ast.get_docstring(tree):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules without an opening docstring: {missing}"


def test_labeling_and_rewards_never_read_the_answer_field():
    """Only the ground-truth reward may touch `.answer`; labeling never does."""
    offenders = []
    for path in list((ROOT / "ttrl" / "labeling").rglob("*.py")) + list((ROOT / "ttrl" / "rewards").rglob("*.py")):
        if path.name in ("ground_truth.py", "custom.py"):  # oracle / opt-in needs_ground_truth
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # `<prompt>.answer` is ground truth; `sample.answer` is a sample's own extracted answer.
            if isinstance(node, ast.Attribute) and node.attr == "answer":
                owner = ast.unparse(node.value)
                if "prompt" in owner or owner == "p":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.answer")
    assert not offenders, f"ground truth read in label-free code: {offenders}"


def test_the_step_grades_only_below_its_metrics_banner():
    """ttrl/step.py reads no ground-truth answer, and grades (label_quality) only under `# ── metrics`."""
    path = ROOT / "ttrl" / "step.py"
    src = path.read_text()
    tree = ast.parse(src)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "step")
    lines = src.splitlines()
    banner = next((i for i in range(fn.lineno, fn.end_lineno + 1)
                   if lines[i - 1].strip().startswith("# ── metrics")), None)
    assert banner is not None, "step() has no `# ── metrics` banner"
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "answer":
            owner = ast.unparse(node.value)
            if "prompt" in owner or owner == "p":
                offenders.append(f"step.py:{node.lineno}: {owner}.answer")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "label_quality" \
                and not banner < node.lineno <= fn.end_lineno:
            offenders.append(f"step.py:{node.lineno}: label_quality outside step()'s metrics stage")
    assert not offenders, f"ground truth above the metrics banner: {offenders}"
