"""Linear layers for decoding on CPUs: a decode step or a tree verification costs what its weights cost to read.

On a CPU a decode step is memory bound. BLAS takes a GEMV path for one row but repacks the weight on every call
for 2+ rows, so verifying a few tree tokens cost 1.5-2x a one-token step with a small model; and its GEMV does not
reach the memory bandwidth on every CPU. ``hass_ext.ops.small_linear`` streams each weight row once for all rows
(bench/bench_small_linear.py measures both). ``use_small_batch_linear(model)`` makes a model's nn.Linear layers
take it for float32 inference calls of up to ``MAX_ROWS`` rows; everything else (prefill, training, other
dtypes and devices) still goes to torch.nn.functional.linear.

``hass_ext.load_target`` applies it to float32 CPU targets, so vanilla decoding and speculative decoding with the
same target run on the same kernels; draft models use it too.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .ops import wants_grad

MAX_ROWS = 64  # small_linear is faster than the BLAS GEMM up to here on the CPUs measured (bench_small_linear.py)


def _small(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 1 and x.numel() <= MAX_ROWS * x.shape[-1]
            and (bias is None or bias.dtype == torch.float32)
            and not wants_grad(x, weight, bias))


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``small_linear`` when it is a small float32 CPU inference call."""
    if _small(x, weight, bias):
        return torch.ops.hass.small_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class SmallBatchLinear(nn.Linear):
    """An nn.Linear (same parameters and state dict) whose small inference calls on CPUs use ``small_linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_small_batch_linear(model: nn.Module) -> int:
    """Switch every plain nn.Linear in ``model`` to SmallBatchLinear, in place; returns how many were switched.

    Parameters, state dict, hooks and outputs on other devices/dtypes are unchanged; on float32 CPU inference
    calls of up to MAX_ROWS rows the outputs differ from BLAS only by summation order (~1e-6 relative).
    ``use_blas_linear`` undoes it.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
            count += 1
    return count


def use_blas_linear(model: nn.Module) -> int:
    """Undo ``use_small_batch_linear``: every SmallBatchLinear in ``model`` becomes a plain nn.Linear again."""
    count = 0
    for module in model.modules():
        if type(module) is SmallBatchLinear:
            module.__class__ = nn.Linear
            count += 1
    return count
