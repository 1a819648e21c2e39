"""hass_ext says per op on which devices its kernels run here, and why not on the others."""
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
