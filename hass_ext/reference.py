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


# ---- tree_attention -------------------------------------------------------------------------------------

def tree_attention_mask(tree_mask: torch.Tensor, L: int, prefix_lens=None) -> torch.Tensor:
    """The explicit bool visibility mask ``[B, n, L]`` of tree attention (prefix visible, tree block = tree_mask)."""
    B, n, _ = tree_mask.shape
    full = torch.zeros(B, n, L, dtype=torch.bool, device=tree_mask.device)
    cols = torch.arange(L - n, device=tree_mask.device)
    lens = (torch.full((B,), L - n, device=tree_mask.device) if prefix_lens is None
            else prefix_lens.to(tree_mask.device))
    full[:, :, :L - n] = (cols[None, :] < lens[:, None])[:, None, :]
    full[:, :, L - n:] = tree_mask
    return full


def _masked_attention(q, k, v, visible, scale):
    """softmax(scale * q k^T) v over the visible keys, GQA by repeating k/v; rows with no visible key give 0."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: 0/0
    return torch.matmul(probs, v)


def reference_tree_attention(q, k, v, tree_mask, scale=None, prefix_lens=None) -> torch.Tensor:
    """Oracle of ops.tree_attention: an explicit [B, n, L] mask and a full softmax, in q's dtype."""
    n, L = q.shape[2], k.shape[2]
    if tree_mask.dim() == 2:
        tree_mask = tree_mask.expand(q.shape[0], n, n)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    visible = tree_attention_mask(tree_mask, L, prefix_lens)[:, None]
    return _masked_attention(q, k, v, visible, scale)
