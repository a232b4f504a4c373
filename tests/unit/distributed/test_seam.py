"""Both runtimes a step can run on implement the seam (`ttrl.distributed.seam.StepRuntime`).

The training `Runtime` (ttrl/distributed/runtime.py) and serve's
`StagingRuntime` (ttrl/serve/learner.py) are read from their source with
`ast`, so that this stays a unit test (importing them would import Ray):
every method of the protocol must be there with the same parameters
(names, kinds, defaults), every data member declared in the class body or
as a property.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from ttrl.distributed.seam import StepRuntime

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
IMPLEMENTATIONS = {"Runtime": ROOT / "ttrl" / "distributed" / "runtime.py",
                   "StagingRuntime": ROOT / "ttrl" / "serve" / "learner.py"}

METHODS = sorted(n for n, v in vars(StepRuntime).items() if not n.startswith("_") and inspect.isfunction(v))
DATA = sorted(StepRuntime.__annotations__)


def _protocol_params(name: str) -> list[tuple[str, str, object]]:
    sig = inspect.signature(getattr(StepRuntime, name))
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values()]


def _source_params(fn: ast.FunctionDef) -> list[tuple[str, str, object]]:
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(a.defaults)) + [
        ast.literal_eval(d) for d in a.defaults]
    out = [(arg.arg, "POSITIONAL_ONLY" if arg in a.posonlyargs else "POSITIONAL_OR_KEYWORD", d)
           for arg, d in zip(positional, defaults)]
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    out += [(arg.arg, "KEYWORD_ONLY", inspect.Parameter.empty if d is None else ast.literal_eval(d))
            for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    return out


def _class(name: str) -> ast.ClassDef:
    tree = ast.parse(IMPLEMENTATIONS[name].read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _is_property(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)


def test_the_protocol_is_read():
    assert {"submit_generate", "collect", "generate", "logprobs", "values", "train_policy", "train_critic",
            "sync_weights", "sleep_engines", "wake_engines", "save", "load", "fingerprint", "scale_lr",
            "shutdown"} <= set(METHODS)
    assert DATA == ["mini", "need_critic", "need_ref", "weights_version"]


@pytest.mark.parametrize("cls", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", METHODS)
def test_every_method_with_the_protocols_parameters(cls: str, name: str):
    fns = {n.name: n for n in _class(cls).body if isinstance(n, ast.FunctionDef)}
    assert name in fns and not _is_property(fns[name]), f"{cls} has no method {name}"
    assert _source_params(fns[name]) == _protocol_params(name), f"{cls}.{name}"


@pytest.mark.parametrize("cls", sorted(IMPLEMENTATIONS))
def test_every_data_member_declared(cls: str):
    body = _class(cls).body
    declared = {n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    declared |= {n.name for n in body if isinstance(n, ast.FunctionDef) and _is_property(n)}
    assert set(DATA) <= declared, f"{cls} lacks {sorted(set(DATA) - declared)}"


def test_a_class_missing_a_member_or_a_parameter_is_caught():
    """The checks above would fail on a runtime that drifts from the protocol."""
    fn = ast.parse("def train_policy(self, batch, opts): ...").body[0]
    assert _source_params(fn) != _protocol_params("train_policy")
    fn = ast.parse("def logprobs(self, batch, temperature, which='policy'): ...").body[0]
    assert _source_params(fn) == _protocol_params("logprobs")
