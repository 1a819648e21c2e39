"""Loads the compiled kernels (hass_ext._C) and says which devices they run on."""
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


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("hass::compact_kv", "CUDA")


def available_devices() -> list:
    """Device types the hass kernels run on in this process ("cpu" always, "cuda" when built in and usable)."""
    devices = ["cpu"]
    # the CUDA kernels are compiled for sm_90a only: they do not load on other architectures
    if _has_cuda_kernels() and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        devices.append("cuda")
    return devices


def kernel_report() -> str:
    """One paragraph saying where the kernels run and, where they do not, why."""
    if not _has_cuda_kernels():
        why = ("this build has no CUDA kernels (CPU torch, or built with HASS_BUILD_CUDA=0)"
               if torch.version.cuda is None or not torch.cuda.is_available()
               else "hass_ext was built without its CUDA kernels; rebuild with HASS_BUILD_CUDA=1")
        return f"hass ops run on CPU tensors only: {why}."
    if not torch.cuda.is_available():
        return "hass ops run on CPU tensors; CUDA kernels are built in but no CUDA device is visible."
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return (f"hass CUDA kernels are compiled for sm_90a (Hopper) only; {torch.cuda.get_device_name()} is "
                f"sm_{major}{minor}, so hass ops run on CPU tensors only here.")
    return f"hass ops run on CPU and CUDA ({torch.cuda.get_device_name()})."


def _warn_if_gpu_unused() -> None:
    """A visible GPU that the kernels cannot use deserves one clear warning at import, not a late failure."""
    if torch.cuda.is_available() and "cuda" not in available_devices():
        warnings.warn(kernel_report(), RuntimeWarning, stacklevel=3)


_warn_if_gpu_unused()
