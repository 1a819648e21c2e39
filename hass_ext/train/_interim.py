"""Plain-PyTorch stand-ins for kernels this build does not have yet (the distillation losses)."""
import torch
import torch.nn.functional as F


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
