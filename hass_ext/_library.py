"""Loads the compiled kernels (hass_ext._C) and says, per op, on which devices they run and why not elsewhere."""
import warnings

import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.hass.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "hass_ext's compiled kernels (hass_ext._C) could not be loaded: "
        f"{e}. Build them with `pip install --no-build-isolation -e .` against the installed torch "
        f"({torch.__version__}); a build made for another torch version does not load."
    ) from e

# Kernels registered for these keys serve every device (ops written as compositions of other ops).
_COMPOSITE_KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd")
# The CUDA kernels are compiled for sm_90a only: their code does not load on other architectures.
_CUDA_ARCH = (9, 0)


def registered_ops() -> list:
    """Names of the ops of the hass library (``torch.ops.hass.<name>``), sorted."""
    names = {n.split("::", 1)[1].split(".", 1)[0]
             for n in torch._C._dispatch_get_all_op_names() if n.startswith("hass::")}
    return sorted(names)


def _has_kernel(op: str, key: str) -> bool:
    qualified = f"hass::{op}"
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, k) for k in (key,) + _COMPOSITE_KEYS)


def _has_cuda_kernels() -> bool:
    return any(_has_kernel(op, "CUDA") for op in registered_ops())


def _cuda_usable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == _CUDA_ARCH


def available_devices() -> list:
    """Device types the hass kernels run on in this process ("cpu" always, "cuda" when built in and usable).

    Per op (some ops may have a CPU kernel only) see :func:`op_devices`.
    """
    devices = ["cpu"]
    if _has_cuda_kernels() and _cuda_usable():
        devices.append("cuda")
    return devices


def op_devices() -> dict:
    """``{op: [device types]}``: where each ``torch.ops.hass`` op runs in this process."""
    cuda_ok = _cuda_usable()
    table = {}
    for op in registered_ops():
        devices = ["cpu"] if _has_kernel(op, "CPU") else []
        if cuda_ok and _has_kernel(op, "CUDA"):
            devices.append("cuda")
        table[op] = devices
    return table


def _cuda_reason() -> str:
    """Why no hass op runs on CUDA here ("" when CUDA kernels are built in and a Hopper GPU is visible)."""
    if not _has_cuda_kernels():
        if torch.version.cuda is None:
            return f"this build has no CUDA kernels (torch {torch.__version__} is a CPU-only build)"
        return ("this build has no CUDA kernels (built with HASS_BUILD_CUDA=0 or without nvcc); "
                "rebuild with HASS_BUILD_CUDA=1")
    if not torch.cuda.is_available():
        return "CUDA kernels are built in but no CUDA device is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != _CUDA_ARCH:
        return (f"the CUDA kernels are compiled for sm_90a (Hopper) only and {torch.cuda.get_device_name()} "
                f"is sm_{major}{minor}")
    return ""


def kernel_report() -> str:
    """Where the kernels run and, where they do not, why: a summary line, then one line per op."""
    why = _cuda_reason()
    if why:
        lines = [f"hass ops run on CPU tensors only: {why}."]
    else:
        lines = [f"hass ops run on CPU and CUDA ({torch.cuda.get_device_name()})."]
    any_cuda = _has_cuda_kernels()
    for op, devices in op_devices().items():
        note = ""
        if "cpu" not in devices:
            note = "no CPU kernel"
        if any_cuda and "cuda" not in devices:  # without any CUDA kernel the first line says it all
            cuda_note = ("a CUDA kernel is built in but cannot run here" if _has_kernel(op, "CUDA")
                         else "no CUDA kernel in this build")
            note = f"{note}; {cuda_note}" if note else cuda_note
        lines.append(f"  {op}: {', '.join(devices) or 'no device'}" + (f" ({note})" if note else ""))
    return "\n".join(lines)


def _warn_if_gpu_unused() -> None:
    """A visible GPU that the kernels cannot use deserves one clear warning at import, not a late failure."""
    if not torch.cuda.is_available():
        return
    if "cuda" not in available_devices():
        warnings.warn(kernel_report(), RuntimeWarning, stacklevel=3)
        return
    missing = [op for op, devices in op_devices().items() if "cuda" not in devices]
    if missing:
        warnings.warn(f"hass ops without a CUDA kernel in this build (CPU tensors only): {', '.join(missing)}",
                      RuntimeWarning, stacklevel=3)


_warn_if_gpu_unused()
