"""Linear layers for decoding on CPUs: a decode step or a tree verification costs what its weights cost to read.

On a CPU a decode step is memory bound. BLAS takes a GEMV path for one row but repacks the weight on every call
for 2+ rows, so verifying a few tree tokens cost 1.5-2x a one-token step with a small model; and its GEMV does not
reach the memory bandwidth on every CPU. ``hass_ext.ops.small_linear`` streams each weight row once for all rows
(bench/bench_small_linear.py measures both). ``use_small_batch_linear(model)`` makes a model's nn.Linear layers
take it for float32 inference calls of up to ``MAX_ROWS`` rows; everything else (prefill, training, other
dtypes and devices) still goes to torch.nn.functional.linear.

``hass_ext.load_target`` applies it to float32 CPU targets, so vanilla decoding and speculative decoding with the
same target run on the same kernels; draft models use it too, with ``exact_bf16=True``: a draft saved in bf16
and loaded in fp32 holds only bf16 values, so its layers stream a bf16 copy of each weight (half the bytes, and
the draft layer then stays in the L3 cache between tree levels) with bit-identical results.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .ops import wants_grad

MAX_ROWS = 64  # small_linear is faster than the BLAS GEMM up to here on the CPUs measured (bench_small_linear.py)


def _small(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype in (torch.float32, torch.bfloat16)
            and x.dim() >= 1 and x.numel() <= MAX_ROWS * x.shape[-1]
            and (bias is None or bias.dtype == torch.float32)
            and not wants_grad(x, weight, bias))


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``small_linear`` when it is a small float32 CPU inference call
    (``weight`` float32, or bfloat16 with float32 ``x``: widened exactly)."""
    if _small(x, weight, bias):
        return torch.ops.hass.small_linear(x, weight, bias)
    if weight.dtype == torch.bfloat16 and x.dtype == torch.float32:  # a bf16 copy of float32 weights
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


class SmallBatchLinear(nn.Linear):
    """An nn.Linear (same parameters and state dict) whose small inference calls on CPUs use ``small_linear``.

    ``exact_bf16`` (class default False): stream a bf16 copy of the weight when it holds only bf16 values. The
    copy is made on first use and again whenever the weight is replaced or changed in place."""

    exact_bf16 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not _small(x, w, self.bias):
            return F.linear(x, w, self.bias)
        if self.exact_bf16:
            w = self._streamed_weight()
        return torch.ops.hass.small_linear(x, w, self.bias)

    def _streamed_weight(self) -> torch.Tensor:
        w = self.weight
        version = (tensor_version(w), w.data_ptr())  # in-place changes, and new storage (.data = ..., .to())
        cached = self.__dict__.get("_bf16_copy")
        if cached is None or cached[0] is not w or cached[1] != version:
            cached = (w, version, as_exact_bf16(w))
            self.__dict__["_bf16_copy"] = cached  # not a buffer: not in the state dict, not moved by .to()
        return w if cached[2] is None else cached[2]


def use_small_batch_linear(model: nn.Module, exact_bf16: bool = False) -> int:
    """Switch every plain nn.Linear in ``model`` to SmallBatchLinear, in place; returns how many were switched.

    Parameters, state dict, hooks and outputs on other devices/dtypes are unchanged; on float32 CPU inference
    calls of up to MAX_ROWS rows the outputs differ from BLAS only by summation order (~1e-6 relative).
    exact_bf16: also stream bf16 copies of weights that hold only bf16 values (same outputs, half the bytes).
    ``use_blas_linear`` undoes it.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
            count += 1
        if type(module) is SmallBatchLinear and exact_bf16:
            module.exact_bf16 = True
    return count


def use_blas_linear(model: nn.Module) -> int:
    """Undo ``use_small_batch_linear``: every SmallBatchLinear in ``model`` becomes a plain nn.Linear again."""
    count = 0
    for module in model.modules():
        if type(module) is SmallBatchLinear:
            module.__class__ = nn.Linear
            module.__dict__.pop("exact_bf16", None)
            module.__dict__.pop("_bf16_copy", None)
            count += 1
    return count
