"""hass_ext says per op on which devices its kernels run here, and why not on the others."""
import pytest
import torch

import hass_ext


def test_registered_ops_match_the_dispatcher():
    ops = hass_ext.registered_ops()
    assert "compact_kv" in ops and ops == sorted(ops)
    for op in ops:
        assert hasattr(torch.ops.hass, op)


def test_op_devices_follow_the_registered_kernels():
    table = hass_ext.op_devices()
    assert set(table) == set(hass_ext.registered_ops())
    for op, devices in table.items():
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"hass::{op}", "CPU")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"hass::{op}", "CUDA")
        assert ("cpu" in devices) == has_cpu, op
        assert ("cuda" in devices) == (has_cuda and "cuda" in hass_ext.available_devices()), op


def test_report_names_every_op_and_the_reason_for_missing_cuda():
    report = hass_ext.kernel_report()
    lines = report.splitlines()
    for op, devices in hass_ext.op_devices().items():
        line = next(l for l in lines if l.strip().startswith(f"{op}:"))
        assert ", ".join(devices) in line
        if "cuda" not in devices and torch._C._dispatch_has_kernel_for_dispatch_key(f"hass::{op}", "CUDA"):
            assert "built in but cannot run here" in line, line
    if "cuda" not in hass_ext.available_devices():
        assert lines[0].startswith("hass ops run on CPU tensors only: ")
        if torch.version.cuda is None:
            assert "CPU-only build" in lines[0]


def _fake_gpu(monkeypatch, capability, cuda_ops):
    """Pretend a GPU of this capability is visible and that `cuda_ops` have CUDA kernels in this build."""
    lib = hass_ext._library
    real = lib._has_kernel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(lib, "_has_kernel", lambda op, key: op in cuda_ops if key == "CUDA" else real(op, key))
    return lib


def test_non_hopper_gpu_is_reported_and_warned(monkeypatch):
    lib = _fake_gpu(monkeypatch, (8, 6), {"compact_kv"})
    assert lib.available_devices() == ["cpu"]
    report = lib.kernel_report()
    assert "sm_90a (Hopper) only and Fake GPU is sm_86" in report.splitlines()[0]
    assert "  compact_kv: cpu (a CUDA kernel is built in but cannot run here)" in report.splitlines()
    with pytest.warns(RuntimeWarning, match="sm_86"):
        lib._warn_if_gpu_unused()


def test_hopper_gpu_lists_ops_without_cuda_kernels(monkeypatch):
    others = [op for op in hass_ext.registered_ops() if op != "compact_kv"]
    lib = _fake_gpu(monkeypatch, (9, 0), {"compact_kv"})
    assert lib.available_devices() == ["cpu", "cuda"]
    assert lib.op_devices()["compact_kv"] == ["cpu", "cuda"]
    report = lib.kernel_report().splitlines()
    assert report[0] == "hass ops run on CPU and CUDA (Fake GPU)."
    for op in others:
        assert f"  {op}: cpu (no CUDA kernel in this build)" in report
    if others:
        with pytest.warns(RuntimeWarning, match="without a CUDA kernel"):
            lib._warn_if_gpu_unused()


def test_built_without_cuda_kernels_on_a_cuda_torch(monkeypatch):
    lib = _fake_gpu(monkeypatch, (9, 0), set())
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert lib.available_devices() == ["cpu"]
    assert "rebuild with HASS_BUILD_CUDA=1" in lib.kernel_report()
