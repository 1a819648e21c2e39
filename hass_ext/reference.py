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


# ---- align_attention ------------------------------------------------------------------------------------

def align_masks(T: int, F: int, device=None) -> torch.Tensor:
    """bool ``[F, T, T]``: level 0 sees c <= t-(F-1); level i >= 1 sees the single c = t-(F-1)+i (hass-reference §3.4)."""
    t = torch.arange(T, device=device)[:, None]
    c = torch.arange(T, device=device)[None, :]
    masks = [c <= t - (F - 1)] + [c == t - (F - 1) + i for i in range(1, F)]
    return torch.stack(masks)


def reference_align_attention(q, k_levels, v_levels, scale=None, semantics: str = "proper") -> torch.Tensor:
    """Oracle of ops.align_attention with explicit [F, T, T] masks and a full softmax over F*T columns.

    semantics="reference" transcribes the HASS training code (cnets_hass.py): logits multiplied by the 0/1
    masks and summed over levels, softmax over all T columns, probabilities multiplied by the masks again.
    """
    F, T = k_levels.shape[0], q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = q.shape[1] // k_levels.shape[2]
    k = k_levels.repeat_interleave(g, dim=2)  # [F, B, Hq, T, d]
    v = v_levels.repeat_interleave(g, dim=2)
    masks = align_masks(T, F, q.device)
    scores = torch.einsum("bhtd,fbhcd->fbhtc", q, k) * scale  # [F, B, Hq, T, T]
    if semantics == "proper":
        scores = scores.masked_fill(~masks[:, None, None], float("-inf"))
        probs = torch.softmax(scores.permute(1, 2, 3, 0, 4).reshape(*q.shape[:3], F * T), dim=-1)
        probs = probs.reshape(*q.shape[:3], F, T).permute(3, 0, 1, 2, 4)
    elif semantics == "reference":
        mf = masks.to(scores.dtype)[:, None, None]
        probs = torch.softmax((scores * mf).sum(0), dim=-1)[None] * mf
    else:
        raise ValueError(f"semantics must be 'proper' or 'reference', got {semantics!r}")
    return torch.einsum("fbhtc,fbhcd->bhtd", probs, v)
