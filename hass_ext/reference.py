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


def distill_topk_indices(target_logits: torch.Tensor, topk: int) -> torch.Tensor:
    """The top-K rule of ops.distill_loss: larger target logit first, lower index first among equal logits."""
    return torch.sort(target_logits.float(), dim=-1, descending=True, stable=True).indices[..., :topk]


def distill_loss_reference(draft_logits: torch.Tensor, target_logits: torch.Tensor, loss_mask: torch.Tensor,
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


def fused_linear_distill_loss_reference(draft_hidden, target_hidden, lm_head_weight, loss_mask, topk=10,
                                        ce_weight=0.1, topk_weight=1.0):
    """Oracle of ops.fused_linear_distill_loss: full logits through the head, then distill_loss_reference."""
    z = draft_hidden.to(lm_head_weight.dtype) @ lm_head_weight.T
    with torch.no_grad():
        t = target_hidden.to(lm_head_weight.dtype) @ lm_head_weight.T
    ce, topk_loss = distill_loss_reference(z, t, loss_mask, topk)
    return ce_weight * ce + topk_weight * topk_loss, ce, topk_loss


def hass_compute_loss_reference(draft_logits: torch.Tensor, target_p: torch.Tensor, loss_mask: torch.Tensor,
                                topk: int = 10):
    """The HASS reference `compute_loss` soft-CE and top-K terms as written (main_hass.py), as (ploss, topk_loss).

    draft_logits ``[B, T, V]``, target_p = softmax(target logits) ``[B, T, V]``, loss_mask ``[B, T, 1]``. Ties in
    torch.topk are resolved however torch resolves them. Used as the speed/memory baseline of the benchmarks.
    """
    out_logp = torch.log_softmax(draft_logits.float(), dim=2)
    plogp = target_p * out_logp
    ploss = -torch.sum(torch.sum(loss_mask * plogp, 2)) / (loss_mask.sum() + 1e-5)
    topk_mask = torch.topk(target_p, k=topk, dim=2).indices
    topk_loss = -torch.sum(torch.sum(loss_mask * plogp.gather(dim=2, index=topk_mask), 2)) / (loss_mask.sum() + 1e-5)
    return ploss, topk_loss
