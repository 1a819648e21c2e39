"""small_linear: ``x @ weight.T + bias`` for the few rows of a decode step or a tree verification on a CPU.

Row invariance: every output is the same fp32 sum in the same order whatever the number of rows, and 16-bit
inputs are widened exactly and the sums rounded once to x's dtype, so a tree node's result is bit-identical to a
one-token step's in float32, bfloat16 and float16 alike. That is what makes speculative decoding lossless bit for
bit (BLAS picks other blockings for other row counts).

On a CPU a decode step is memory bound. BLAS takes a GEMV path for one row but repacks the weight on every call
for 2+ rows, so verifying a few tree tokens costs noticeably more than a one-token step with a small model; and its
GEMV does not reach the memory bandwidth on every CPU. The ``small_linear`` kernel streams each weight row once for
all rows (bench/bench_small_linear.py measures both).

- ``small_linear(x, weight, bias)``: the op, with its argument checks.
- ``linear(x, weight, bias)``: ``F.linear``, through the op when the call is small enough to gain from it.
- ``SmallLinear``: an ``nn.Linear`` whose small CPU inference calls (up to ``MAX_ROWS`` rows, any number inside
  ``row_invariant()``) take the op; everything else (prefill, training, other devices) still goes to
  ``torch.nn.functional.linear``.
- ``row_invariant()``: a context in which SmallLinear layers take every CPU inference call, whatever its row count
  (the decode loops run their verification forwards and decode steps in it).
- ``use_small_linear(model)`` / ``use_blas_linear(model)``: switch a model's ``nn.Linear`` layers to SmallLinear
  and back.

``hass_ext.load_target`` applies it to CPU targets of every dtype, so vanilla decoding and speculative decoding with the
same target run on the same kernels; draft models use it too, with ``exact_bf16=True``: a draft saved in bf16
and loaded in fp32 holds only bf16 values, so its layers stream a bf16 copy of each weight (half the bytes, and
the draft layer then stays in the L3 cache between tree levels) with bit-identical results.
"""
import threading
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _library  # noqa: F401  (registers torch.ops.hass.*)
from ._checks import check_tensor, describe, wants_grad

MAX_ROWS = 64  # up to here the kernel beats the BLAS GEMM on the CPUs measured (bench/bench_small_linear.py)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_STATE = threading.local()  # row_invariant() depth, per thread


@torch.library.register_fake("hass::small_linear")
def _small_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a few rows, as memory-bound as one row (inference only).

    x: ``[..., K]`` float32, bfloat16 or float16 on the CPU or a CUDA device (the CUDA kernel: each output summed
    in a fixed per-lane order of k and a fixed warp reduction, docs/kernels.md), a handful of rows (a decode step, a tree verification;
    past ``MAX_ROWS`` rows a BLAS GEMM is faster: see ``linear``). weight: ``[N, K]`` float32, bfloat16 or float16
    (nn.Linear layout); 16-bit weights are widened exactly, for half the bytes read. bias: ``[N]`` (any of the three
    dtypes) or None. Returns ``[..., N]`` in x's dtype: the fp32 sum rounded once.

    Each weight row is read once for all rows of x, and each output is summed in a fixed order whatever the
    number of rows, so a tree node's result is bit-identical to a one-token step over the same input. No autograd:
    use torch.nn.functional.linear for training.
    """
    _check_linear_args("small_linear", x, weight, bias, _FLOATS, _FLOATS)
    return torch.ops.hass.small_linear(x, weight, bias)


def _check_linear_args(name: str, x, weight, bias, x_dtypes, weight_dtypes) -> None:
    check_tensor("x", x, dtypes=x_dtypes)
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"x must be on the CPU or a CUDA device, got {describe(x)}")
    check_tensor("weight", weight, dims=(2,), dtypes=weight_dtypes, device=x.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., {weight.shape[1]}] to match weight {tuple(weight.shape)}, got {describe(x)}")
    if bias is not None:
        check_tensor("bias", bias, dims=(1,), dtypes=_FLOATS, device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} entries (weight rows), got {describe(bias)}")
    if wants_grad(x, weight, bias):
        raise ValueError(f"{name} has no backward: call it under torch.no_grad()/inference_mode(), or use "
                         "torch.nn.functional.linear for training")


@torch.library.register_fake("hass::small_linear_tc")
def _small_linear_tc_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def small_linear_tc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``small_linear`` on tensor cores: ``x @ weight.T + bias`` for decode-sized M, x and weight both bfloat16 or
    both float16, K a multiple of 8.

    On CUDA each output is a sum of mma.sync products accumulated in fp32 in an order fixed by N and K alone (K
    split into segments by N and K, 64-k blocks in order, four mma steps per block, the segments added in order),
    so a row's result is bit-identical whatever M is and wherever the row sits, like small_linear's, while the
    multiplications run on tensor cores (small_linear's CUDA kernel is bound by its fp32 FMAs past a dozen rows).
    Its bits differ from small_linear's (another summation order): a model decodes with one or the other for
    every call. On the CPU it is small_linear (row-invariant already). bias: ``[N]`` in any float dtype, or None.
    Returns ``[..., N]`` in x's dtype. No autograd.
    """
    _check_linear_args("small_linear_tc", x, weight, bias, (torch.bfloat16, torch.float16), (x.dtype,))
    if weight.shape[1] % 8:
        raise ValueError(f"small_linear_tc needs K = weight.shape[1] to be a multiple of 8, got {describe(weight)}")
    return torch.ops.hass.small_linear_tc(x, weight, bias)


def tensor_core_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``small_linear_tc`` takes this call: CUDA, x and weight of one 16-bit dtype, K % 8 == 0."""
    return (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.shape[1] % 8 == 0)


@contextmanager
def row_invariant():
    """Inside this context, SmallLinear layers send every CPU inference call to ``small_linear``, whatever its
    number of rows, so a forward's rows do not depend on each other (a tree larger than ``MAX_ROWS`` too)."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _small(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether the op takes this call: a small CPU or CUDA inference call in the op's dtypes (no checks needed past
    this). SmallLinear layers exist only where use_small_linear put them: on CPUs by default (load_target)."""
    return (x.device.type in ("cpu", "cuda") and x.dtype in _FLOATS and weight.dtype in _FLOATS and x.dim() >= 1
            and (x.numel() <= MAX_ROWS * x.shape[-1] or getattr(_STATE, "depth", 0) > 0)
            and (bias is None or bias.dtype in _FLOATS)
            and not wants_grad(x, weight, bias))


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``small_linear`` when it is a small CPU inference call (a 16-bit
    weight with float32 ``x`` is widened exactly)."""
    if _small(x, weight, bias):
        return torch.ops.hass.small_linear(x, weight, bias)
    if weight.dtype != x.dtype and weight.dtype in _FLOATS and x.dtype == torch.float32:  # a 16-bit copy
        weight = weight.float()
    return F.linear(x, weight, bias)


def tensor_version(t: torch.Tensor) -> int:
    """``t._version`` (bumped by in-place changes); -1 for an inference tensor, which cannot change in place."""
    try:
        return t._version
    except RuntimeError:
        return -1


def as_exact_bf16(weight: torch.Tensor):
    """``weight`` as bfloat16 if that conversion is exact (every value a bf16 value), else None."""
    w = weight.detach()
    if w.dtype != torch.float32:
        return None
    w16 = w.to(torch.bfloat16)
    return w16 if torch.equal(w16.float(), w) else None


class SmallLinear(nn.Linear):
    """An nn.Linear (same parameters and state dict) whose small inference calls on CPUs use ``small_linear``.

    ``exact_bf16`` (class default False): stream a bf16 copy of the weight when it holds only bf16 values. The
    copy is made on first use and again whenever the weight is replaced or changed in place."""

    exact_bf16 = False
    tensor_cores = False  # CUDA calls of one 16-bit dtype take small_linear_tc (use_small_linear(tensor_cores=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not _small(x, w, self.bias):
            return F.linear(x, w, self.bias)
        if self.tensor_cores and tensor_core_eligible(x, w):
            return torch.ops.hass.small_linear_tc(x, w, self.bias)
        if self.exact_bf16:
            w = self._streamed_weight()
        return torch.ops.hass.small_linear(x, w, self.bias)

    def _streamed_weight(self) -> torch.Tensor:
        w = self.weight
        if torch.compiler.is_compiling():
            # The copy's freshness check reads storage pointers, which a traced graph cannot: a compiled call
            # streams the weight itself (the same values, so the same output bits; only twice the bytes).
            return w
        version = (tensor_version(w), w.data_ptr())  # in-place changes, and new storage (.data = ..., .to())
        cached = self.__dict__.get("_bf16_copy")
        if cached is None or cached[0] is not w or cached[1] != version:
            cached = (w, version, as_exact_bf16(w))
            self.__dict__["_bf16_copy"] = cached  # not a buffer: not in the state dict, not moved by .to()
        return w if cached[2] is None else cached[2]


def use_small_linear(model: nn.Module, exact_bf16: bool = False, tensor_cores: bool = False) -> int:
    """Switch every plain nn.Linear in ``model`` to SmallLinear, in place; returns how many were switched.

    Parameters, state dict, hooks and outputs on other devices are unchanged; on CPU inference calls of up to
    MAX_ROWS rows (any number inside ``row_invariant()``) the outputs differ from BLAS only by summation order
    (and, in 16-bit dtypes, by rounding once instead of BLAS's own way).
    exact_bf16: also stream bf16 copies of weights that hold only bf16 values (same outputs, half the bytes).
    tensor_cores: CUDA calls whose x and weight share a 16-bit dtype (K % 8 == 0) take ``small_linear_tc`` (still
    row-invariant, other bits than small_linear's; not yet run on a GPU: see docs/kernels.md).
    ``use_blas_linear`` undoes it.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallLinear
            count += 1
        if type(module) is SmallLinear and exact_bf16:
            module.exact_bf16 = True
        if type(module) is SmallLinear and tensor_cores:
            module.tensor_cores = True
    return count


def use_blas_linear(model: nn.Module) -> int:
    """Undo ``use_small_linear``: every SmallLinear in ``model`` becomes a plain nn.Linear again."""
    count = 0
    for module in model.modules():
        if type(module) is SmallLinear:
            module.__class__ = nn.Linear
            module.__dict__.pop("exact_bf16", None)
            module.__dict__.pop("tensor_cores", None)
            module.__dict__.pop("_bf16_copy", None)
            count += 1
    return count


# ---- deprecated names ---------------------------------------------------------------------------------------

def use_small_batch_linear(model: nn.Module, exact_bf16: bool = False) -> int:
    """Deprecated name of :func:`use_small_linear`."""
    warnings.warn("use_small_batch_linear is deprecated: use hass_ext.use_small_linear", DeprecationWarning,
                  stacklevel=2)
    return use_small_linear(model, exact_bf16)


def __getattr__(name: str):
    if name == "SmallBatchLinear":  # the former name of SmallLinear
        warnings.warn("SmallBatchLinear is deprecated: use hass_ext.SmallLinear", DeprecationWarning, stacklevel=2)
        return SmallLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
