"""Plain-PyTorch oracles of the hass kernels: ``<op>_oracle`` computes what ``hass_ext.ops.<op>`` must return.

Used only by tests and benchmarks, never by the product path. ``hass_compute_loss_reference`` is not an oracle
but the upstream HASS code's loss as written (the benchmarks' baseline); "reference" in this package always means
the upstream HASS/EAGLE code.
"""
import torch

from .ops.align_attention import ALIGN_ATTENTION_MODES
from .sampling import filtered_probs


def compact_kv_oracle(caches, src_slots: torch.Tensor, dst_start: torch.Tensor) -> None:
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


# ---- verify_tree ------------------------------------------------------------------------------------------

def verify_tree_oracle(target_logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       generator: torch.Generator = None, uniforms: torch.Tensor = None):
    """Oracle of ops.verify_tree: the accept/renormalise walk on filtered_probs, one row and one sibling at a time.

    With the same generator state (or the same uniforms) it consumes the same random stream as the CPU kernel:
    ``uniforms[b, c]`` decides child node c, ``uniforms[b, 0]`` draws the final token by inverse CDF.
    Numerics: filtered_probs sums in fp32; for top_p close to 1 over a large vocabulary its cumulative sum can
    place the top-p boundary one token away from the exact one, which the kernels (exact fixed-point sums) hit.
    """
    B, n, V = target_logits.shape
    greedy = temperature == 0
    if not greedy and uniforms is None:
        uniforms = torch.rand(B, n, generator=generator, dtype=torch.float32, device=target_logits.device)
    accepted = torch.full((B, n), -1, dtype=torch.int64)
    accept_len = torch.zeros(B, dtype=torch.int64)
    next_token = torch.zeros(B, dtype=torch.int64)
    par = parents.cpu().tolist()
    tok = draft_tokens.cpu().tolist()
    u = None if greedy else uniforms.cpu().tolist()
    for b in range(B):
        node, path = 0, [0]
        while True:
            row = target_logits[b, node].float().cpu()
            if torch.isnan(row).any() or (row == float("inf")).any() or not torch.isfinite(row).any():
                raise ValueError(f"target_logits[{b}, {node}] contains NaN or +Inf, or no finite logit")
            children = [c for c in range(node + 1, n) if par[b][c] == node]
            nxt = None
            if greedy:
                best = int(torch.argmax(row))
                nxt = next((c for c in children if tok[b][c] == best), None)
            else:
                p = filtered_probs(row, temperature, top_p, top_k)
                rejected = set()
                for c in children:
                    x = tok[b][c]
                    if x in rejected:
                        continue
                    if u[b][c] < float(p[x]):
                        nxt = c
                        break
                    rejected.add(x)
                    p[x] = 0.0
                    p = p / p.sum()
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        accepted[b, :len(path)] = torch.tensor(path)
        accept_len[b] = len(path) - 1
        if greedy:
            next_token[b] = int(torch.argmax(row))
        else:  # inverse CDF over the residual in token-id order: first token whose cumulative mass exceeds u
            cum = torch.cumsum(p.double(), 0)
            j = int(torch.searchsorted(cum, u[b][0] * cum[-1], right=True))
            next_token[b] = min(j, int(p.nonzero().max()))
    return accepted, accept_len, next_token


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


def tree_attention_oracle(q, k, v, tree_mask, scale=None, prefix_lens=None) -> torch.Tensor:
    """Oracle of ops.tree_attention: an explicit [B, n, L] mask and a full softmax, in q's dtype."""
    n, L = q.shape[2], k.shape[2]
    if tree_mask.dim() == 2:
        tree_mask = tree_mask.expand(q.shape[0], n, n)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    visible = tree_attention_mask(tree_mask, L, prefix_lens)[:, None]
    return _masked_attention(q, k, v, visible, scale)


# ---- align_attention ------------------------------------------------------------------------------------

def align_masks(T: int, F: int, device=None) -> torch.Tensor:
    """bool ``[F, T, T]``: level 0 sees c <= t-(F-1); level i >= 1 sees the single c = t-(F-1)+i."""
    t = torch.arange(T, device=device)[:, None]
    c = torch.arange(T, device=device)[None, :]
    masks = [c <= t - (F - 1)] + [c == t - (F - 1) + i for i in range(1, F)]
    return torch.stack(masks)


def align_attention_oracle(q, k_levels, v_levels, scale=None, semantics: str = "proper") -> torch.Tensor:
    """Oracle of ops.align_attention with explicit [F, T, T] masks and a full softmax over F*T columns.

    semantics="reference" transcribes the upstream HASS training code (cnets_hass.py): logits multiplied by the 0/1
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
        raise ValueError(f"semantics must be one of {ALIGN_ATTENTION_MODES}, got {semantics!r}")
    return torch.einsum("fbhtc,fbhcd->bhtd", probs, v)


# ---- distill_loss ---------------------------------------------------------------------------------------

def distill_topk_indices(target_logits: torch.Tensor, topk: int) -> torch.Tensor:
    """The top-K rule of ops.distill_loss: larger target logit first, lower index first among equal logits."""
    return torch.sort(target_logits.float(), dim=-1, descending=True, stable=True).indices[..., :topk]


def distill_loss_oracle(draft_logits: torch.Tensor, target_logits: torch.Tensor, loss_mask: torch.Tensor,
                        topk: int = 10):
    """Oracle of ops.distill_loss: HASS `compute_loss` (main_hass.py) with fp32 logits, as (ce, topk).

    Differs from HASS only in the top-K tie rule (made deterministic, see distill_topk_indices).
    """
    V = draft_logits.shape[-1]
    up = torch.promote_types(draft_logits.dtype, torch.float32)  # fp32, or fp64 for a float64 check
    z = draft_logits.reshape(-1, V).to(up)
    t = target_logits.detach().reshape(-1, V).to(up)
    m = loss_mask.detach().reshape(-1).to(up)[:, None]
    p = torch.softmax(t, dim=-1)
    plogq = p * torch.log_softmax(z, dim=-1)
    S = m.sum() + 1e-5
    ce = -torch.sum(m * plogq) / S
    idx = distill_topk_indices(t, topk)
    topk_loss = -torch.sum(m * plogq.gather(-1, idx)) / S
    return ce, topk_loss


def fused_linear_distill_loss_oracle(draft_hidden, target_hidden, lm_head_weight, loss_mask, topk=10,
                                     ce_weight=0.1, topk_weight=1.0):
    """Oracle of ops.fused_linear_distill_loss: full logits through the head, then distill_loss_oracle."""
    z = draft_hidden.to(lm_head_weight.dtype) @ lm_head_weight.T
    with torch.no_grad():
        t = target_hidden.to(lm_head_weight.dtype) @ lm_head_weight.T
    ce, topk_loss = distill_loss_oracle(z, t, loss_mask, topk)
    return ce_weight * ce + topk_weight * topk_loss, ce, topk_loss


def hass_compute_loss_reference(draft_logits: torch.Tensor, target_p: torch.Tensor, loss_mask: torch.Tensor,
                                topk: int = 10):
    """The upstream HASS `compute_loss` soft-CE and top-K terms as written (main_hass.py), as (ploss, topk_loss).

    draft_logits ``[B, T, V]``, target_p = softmax(target logits) ``[B, T, V]``, loss_mask ``[B, T, 1]``. Ties in
    torch.topk are resolved however torch resolves them. Used as the speed/memory baseline of the benchmarks.
    """
    out_logp = torch.log_softmax(draft_logits.float(), dim=2)
    plogp = target_p * out_logp
    ploss = -torch.sum(torch.sum(loss_mask * plogp, 2)) / (loss_mask.sum() + 1e-5)
    topk_mask = torch.topk(target_p, k=topk, dim=2).indices
    topk_loss = -torch.sum(torch.sum(loss_mask * plogp.gather(dim=2, index=topk_mask), 2)) / (loss_mask.sum() + 1e-5)
    return ploss, topk_loss
