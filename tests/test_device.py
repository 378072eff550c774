"""Device and precision choice (core.device): what "auto" resolves to, and the CPU allocator tuning."""

import platform
import sys

import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError, TrainConfig, Trainer
from napari_sparseseg.core import device, training


def _cpu_features(monkeypatch, amx: bool, avx512_bf16: bool):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(False, False, False), (False, True, True), (True, False, True)])
def test_bfloat16_is_fast_on_cpus_with_native_bfloat16(monkeypatch, amx, avx512_bf16, fast):
    _cpu_features(monkeypatch, amx, avx512_bf16)
    cpu = torch.device("cpu")
    assert device.fast_bfloat16(cpu) is fast
    assert device.resolve_precision("auto", cpu) == (torch.bfloat16 if fast else None)
    # an explicit choice is obeyed whatever the CPU
    assert device.resolve_precision("float32", cpu) is None
    assert device.resolve_precision("bfloat16", cpu) == torch.bfloat16


def test_bfloat16_is_not_assumed_on_other_devices():
    assert device.fast_bfloat16(torch.device("mps")) is False
    assert device.resolve_precision("auto", torch.device("mps")) is None


def test_auto_is_float32_on_cuda_gpus_even_with_bfloat16(monkeypatch):
    # measured on an H200 (benchmarks/gpu.py, docs/benchmarks.md): the networks are small enough
    # that GPU steps are bound by kernel launches, and autocast's casts made them slower
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert device.fast_bfloat16(cuda) is False
    assert device.resolve_precision("auto", cuda) is None
    assert device.resolve_precision("bfloat16", cuda) == torch.bfloat16


def test_unknown_precision_is_an_error_naming_the_choices():
    with pytest.raises(SparseSegError, match=r"precision 'half': expected one of auto, float32, bfloat16"):
        device.resolve_precision("half", torch.device("cpu"))


def test_unknown_device_is_an_error_naming_the_choices():
    with pytest.raises(SparseSegError, match=r"device 'tpu': expected auto, cpu, cuda \(or cuda:N\) or mps"):
        device.resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error():
    with pytest.raises(SparseSegError, match="no CUDA GPU is available here"):
        device.resolve_device("cuda")


def test_autocast_runs_the_forward_pass_in_the_chosen_dtype():
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.ones(1, 1, 8, 8)
    with device.autocast(torch.device("cpu"), torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with device.autocast(torch.device("cpu"), None):
        assert conv(x).dtype == torch.float32


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_thresholds_are_set_through_mallopt(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(device.ctypes, "CDLL", lambda name: FakeLibc())
    assert device.tune_allocator() is True
    assert calls == [(device.M_MMAP_THRESHOLD, 32 << 20), (device.M_TRIM_THRESHOLD, 256 << 20)]
    # and the real call succeeds here
    monkeypatch.undo()
    assert device.tune_allocator() is True


def test_allocator_tuning_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(device.sys, "platform", "darwin")
    assert device.tune_allocator() is False
    monkeypatch.undo()
    monkeypatch.setattr(device.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert device.tune_allocator() is False


def test_cpu_training_tunes_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(training, "tune_allocator", lambda: calls.append(1) or True)
    labels = np.zeros((32, 32), np.int32)
    labels[4:12, 4:12] = 1
    labels[18:26, 18:26] = 2
    Trainer([labels.astype(np.float32)], [labels], TrainConfig(device="cpu", iterations=1))
    assert calls == [1]
