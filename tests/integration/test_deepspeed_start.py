"""DeepSpeed, really imported: what ttrl leaves out of its start (ttrl.trainer.worker._lighten_deepspeed)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_deepspeed_is_started_without_what_this_project_never_uses(monkeypatch):
    """The Muon optimizer's module (it compiles kernels when imported) and, on CPU, the shared-memory
    all-reduce kernel (a C++ build of about a minute on a fresh machine) are left out."""
    import importlib
    import sys

    from ttrl.trainer.worker import MUON_MODULE, _lighten_deepspeed

    monkeypatch.delitem(sys.modules, MUON_MODULE, raising=False)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(ds_torch, "build_shm_op", ds_torch.build_shm_op)  # restored after the test
    _lighten_deepspeed("cpu")
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    assert not isinstance(object(), MuonWithAuxAdam) and "ttrl" in sys.modules[MUON_MODULE].__doc__
    assert ds_torch.build_shm_op() is None
    import torch
    from deepspeed.runtime.zero.utils import is_zero_supported_optimizer

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    monkeypatch.setattr("deepspeed.comm.get_rank", lambda: 1)
    assert is_zero_supported_optimizer(opt), "ZeRO still recognises the optimizers it supports"
