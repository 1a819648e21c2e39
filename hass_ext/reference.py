"""Plain-PyTorch oracles of the hass kernels. Used only by tests and benchmarks, never by the product path."""
import torch


def compact_kv_reference(caches, src_slots: torch.Tensor, dst_start: torch.Tensor) -> None:
    """In-place oracle of ops.compact_kv: gather every source entry, then write the destinations."""
    if isinstance(caches, torch.Tensor):
        caches = [caches]
    src = src_slots.reshape(-1, src_slots.shape[-1])
    dst = dst_start.reshape(-1)
    for c in caches:
        bdim = c.dim() - 4
        for b in range(src.shape[0]):
            idx = src[b][src[b] >= 0]
            row = c.select(bdim, b)  # [..., H, S, D]
            moved = row.index_select(-2, idx).clone()
            row[..., int(dst[b]):int(dst[b]) + idx.numel(), :] = moved
