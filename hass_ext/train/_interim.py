"""Plain-PyTorch stand-ins for kernels this build does not have yet (align_attention, distill losses)."""
import torch
import torch.nn.functional as F


def align_attention(q, k_levels, v_levels, scale=None, semantics="masked"):
    nF, B, Hkv, T, d = k_levels.shape
    Hq = q.shape[1]
    scale = d ** -0.5 if scale is None else scale
    rep = Hq // Hkv
    k = k_levels.repeat_interleave(rep, dim=2)  # [F, B, Hq, T, d]
    v = v_levels.repeat_interleave(rep, dim=2)
    s = torch.einsum("bhtd,fbhcd->fbhtc", q.float(), k.float()) * scale
    r = torch.arange(T, device=q.device)[:, None]
    c = torch.arange(T, device=q.device)[None, :]
    masks = [c <= r - (nF - 1)] + [c == r - (nF - 1) + i for i in range(1, nF)]
    allowed = torch.stack(masks)[:, None, None]  # [F, 1, 1, T, T]
    if semantics == "reference":
        logits = (s * allowed).sum(0)
        p = torch.softmax(logits, -1)
        w = p.unsqueeze(0) * allowed
    else:
        s = s.masked_fill(~allowed, float("-inf"))
        flat = s.permute(1, 2, 3, 0, 4).reshape(B, Hq, T, nF * T)
        w = torch.softmax(flat, -1).reshape(B, Hq, T, nF, T).permute(3, 0, 1, 2, 4)
    return torch.einsum("fbhtc,fbhcd->bhtd", w, v.float()).to(q.dtype)


def fused_linear_distill_loss(draft_hidden, target_hidden, lm_head_weight, loss_mask, topk=10, ce_weight=0.1,
                              topk_weight=1.0):
    w = lm_head_weight.detach()
    logq = F.log_softmax((draft_hidden @ w.t()).float(), -1)
    with torch.no_grad():
        p = torch.softmax((target_hidden @ w.t()).float(), -1)
        top = torch.zeros_like(p).scatter_(-1, p.topk(topk, -1).indices, 1.0)
    m = loss_mask.float()
    S = m.sum() + 1e-5
    plogq = p * logq
    ce = -(plogq.sum(-1) * m).sum() / S
    tk = -((plogq * top).sum(-1) * m).sum() / S
    return ce_weight * ce + topk_weight * tk, ce, tk
