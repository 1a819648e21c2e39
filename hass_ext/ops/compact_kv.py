"""compact_kv: move the accepted tree entries of every KV cache into contiguous slots, in place."""
from typing import Sequence, Union

import torch

from .. import _library  # noqa: F401  (registers torch.ops.hass.*)
from ._checks import INDEX_DTYPES, as_index_tensor, check_tensor, describe


@torch.library.register_fake("hass::compact_kv")
def _compact_kv_fake(caches, src_slots, dst_start):
    return None


def compact_kv(caches: Union[torch.Tensor, Sequence[torch.Tensor]], src_slots, dst_start) -> None:
    """Move the accepted tree entries of every KV cache into contiguous slots, in place, in one call.

    caches: one tensor or a list of tensors, each ``[B, H, S, D]`` (one layer's K or V) or
        ``[lead, B, H, S, D]`` (all layers stacked, e.g. lead = 2 * layers). Any float dtype; last dim contiguous.
    src_slots: int64 ``[m]`` or ``[B, m]`` (or a list of ints): the cache slots of the accepted entries, in
        order; ``-1`` pads rows of a ragged batch (padding only after the valid entries).
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
        check_tensor(f"caches[{i}]", c, dims=(4, 5), device=device)
        if not c.is_floating_point():
            raise ValueError(f"caches[{i}] must be a floating-point tensor, got {describe(c)}")
        if c.stride(-1) != 1:
            raise ValueError(f"caches[{i}] must be contiguous in its last dim, got strides {c.stride()}")
    src_slots = as_index_tensor("src_slots", src_slots, device)
    check_tensor("src_slots", src_slots, dims=(1, 2), dtypes=INDEX_DTYPES, device=device)
    B = caches[0].shape[caches[0].dim() - 4]
    if src_slots.dim() == 1:  # the same plan for every batch row
        src_slots = src_slots.unsqueeze(0).expand(B, -1)
    B = src_slots.shape[0]
    for i, c in enumerate(caches):
        cb = c.shape[c.dim() - 4]
        if cb != B:
            raise ValueError(f"caches[{i}] has batch {cb} but src_slots has {B} rows ({describe(c)})")
    if isinstance(dst_start, bool):
        raise ValueError(f"dst_start must be an int or an int64 tensor, got {dst_start!r}")
    if isinstance(dst_start, int):
        dst_start = torch.full((B,), dst_start, dtype=torch.int64, device=device)
    check_tensor("dst_start", dst_start, dims=(1,), dtypes=INDEX_DTYPES, device=device)
    if dst_start.shape[0] != B:
        raise ValueError(f"dst_start must have {B} entries (one per batch row), got {describe(dst_start)}")
    torch.ops.hass.compact_kv(caches, src_slots, dst_start)
