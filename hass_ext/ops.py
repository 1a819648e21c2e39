"""Python entry points of the hass kernels (torch.ops.hass.*): input validation and fake implementations.

Each wrapper checks its inputs and raises ValueError naming the argument, its shape/dtype and what was
expected; the kernels themselves live in csrc/ (CPU) and csrc/cuda (CUDA). Oracles: hass_ext/reference.py.
"""
from typing import Sequence, Union

import torch

from . import _library  # noqa: F401  (registers the ops)

_INDEX_DTYPES = (torch.int64,)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, *, dims=None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {_describe(t)}")


# ---- compact_kv -------------------------------------------------------------------------------------------

@torch.library.register_fake("hass::compact_kv")
def _compact_kv_fake(caches, src_slots, dst_start):
    return None


def compact_kv(caches: Union[torch.Tensor, Sequence[torch.Tensor]], src_slots, dst_start) -> None:
    """Move the accepted tree entries of every KV cache into contiguous slots, in place, in one call.

    caches: one tensor or a list of tensors, each ``[B, H, S, D]`` (one layer's K or V) or
        ``[lead, B, H, S, D]`` (all layers stacked, e.g. lead = 2 * layers). Any float dtype; last dim contiguous.
    src_slots: int64 ``[m]`` or ``[B, m]``: the cache slots of the accepted entries, in order; ``-1`` pads
        rows of a ragged batch (padding only after the valid entries).
    dst_start: int or int64 ``[B]``: the first destination slot of each batch row.
    After the call, ``cache[..., b, :, dst_start[b] + i, :]`` holds what ``cache[..., b, :, src_slots[b, i], :]``
    held before, for every valid i; sources and destinations may overlap. Other slots are unchanged.
    """
    if isinstance(caches, torch.Tensor):
        caches = [caches]
    caches = list(caches)
    if not caches:
        raise ValueError("compact_kv: caches is empty")
    device = caches[0].device
    for i, c in enumerate(caches):
        _check_tensor(f"caches[{i}]", c, dims=(4, 5), device=device)
        if not c.is_floating_point():
            raise ValueError(f"caches[{i}] must be a floating-point tensor, got {_describe(c)}")
        if c.stride(-1) != 1:
            raise ValueError(f"caches[{i}] must be contiguous in its last dim, got strides {c.stride()}")
    if not isinstance(src_slots, torch.Tensor):
        src_slots = torch.as_tensor(src_slots, dtype=torch.int64, device=device)
    _check_tensor("src_slots", src_slots, dims=(1, 2), dtypes=_INDEX_DTYPES, device=device)
    B = caches[0].shape[caches[0].dim() - 4]
    if src_slots.dim() == 1:  # the same plan for every batch row
        src_slots = src_slots.unsqueeze(0).expand(B, -1)
    B = src_slots.shape[0]
    for i, c in enumerate(caches):
        cb = c.shape[c.dim() - 4]
        if cb != B:
            raise ValueError(f"caches[{i}] has batch {cb} but src_slots has {B} rows ({_describe(c)})")
    if isinstance(dst_start, int):
        dst_start = torch.full((B,), dst_start, dtype=torch.int64, device=device)
    _check_tensor("dst_start", dst_start, dims=(1,), dtypes=_INDEX_DTYPES, device=device)
    if dst_start.shape[0] != B:
        raise ValueError(f"dst_start must have {B} entries (one per batch row), got {_describe(dst_start)}")
    torch.ops.hass.compact_kv(caches, src_slots, dst_start)
