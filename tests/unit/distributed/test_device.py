"""device=auto: a GPU torch cannot use is reported, not silently replaced by the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from ttrl.distributed import device as dev

pytestmark = pytest.mark.unit


def _old_driver():
    warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).\n"
                  "Please update your GPU driver.", UserWarning, stacklevel=1)
    return False


def test_auto_falls_back_to_cpu_loudly_when_the_driver_is_too_old(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", _old_driver)
    assert dev.resolve_device("auto") == "cpu"
    err = capsys.readouterr().err
    assert "WARNING" in err and "driver on your system is too old" in err and "device=cpu" in err


def test_auto_names_a_cpu_only_torch_on_a_gpu_host(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "gpu_present", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert dev.resolve_device("auto") == "cpu"
    assert "built without CUDA" in capsys.readouterr().err


def test_auto_is_quiet_on_a_machine_without_a_gpu_and_explicit_devices_are_kept(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "gpu_present", lambda: False)
    assert dev.resolve_device("auto") == "cpu" and capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto") == "cuda"
    assert dev.resolve_device("cpu") == "cpu" and dev.resolve_dtype("auto", "cuda") == "bfloat16"
    assert dev.resolve_dtype("auto", "cpu") == "float32" and dev.resolve_dtype("float16", "cuda") == "float16"
