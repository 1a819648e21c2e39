"""hass_ext: HASS speculative decoding for PyTorch.

A one-layer draft head proposes a tree of tokens (EAGLE-2 dynamic tree), the target model verifies the whole
tree in one forward pass, and accepted tokens are kept: decoding gets faster, its output does not change.
HASS trains the draft better than EAGLE-2 (top-K ranking distillation + harmonized context alignment).

Importing the package registers the kernels as ``torch.ops.hass.*``; the Python API is below.
"""
import importlib

from ._version import __version__  # noqa: F401
from ._library import available_devices, kernel_report, op_devices, registered_ops  # noqa: F401  (loads _C)
from . import ops, sampling  # noqa: F401
from .hf_attention import register_hass_tree  # noqa: F401
from .ops.small_linear import SmallLinear, use_blas_linear, use_small_batch_linear, use_small_linear  # noqa: F401
from .draft_io import CheckpointError, load_draft, save_draft  # noqa: F401
from .draft import DraftConfig, DraftModel, init_draft  # noqa: F401
from .generate import GenerationResult, generate, stream  # noqa: F401
from .target import Target, load_target  # noqa: F401
from .lossless import LosslessReport, check_lossless  # noqa: F401


def __getattr__(name: str):
    # Former module names, once loaded by `import hass_ext`: importing them now warns (DeprecationWarning).
    if name in ("attention", "cpu_linear"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
