"""fused_linear_distill_loss: the HASS distillation losses straight from hidden states through a frozen lm_head,
never holding the N x V logits.

The head is linear, so every vocabulary sum collapses to an H-vector per row (W_v = row v of the head):
  sum_v p_v z_v = <x, P>,           P   = sum_v p_v W_v              (target side only: p_w)
  sum_{v in K} p_v z_v = <x, P_K>,  P_K = sum_{v in K} p_v W_v       (target side only: pk_w)
  ce_row = lse(z) - <x, P>,  topk_row = pk lse(z) - <x, P_K>,  pk = sum_{v in K} p_v
  dce/dx = (m/S) (Q - P),  dtopk/dx = (m/S) (pk Q - P_K),  Q = sum_v q_v W_v = softmax(x W^T) W
P, P_K and the top-K come from one streaming pass over the head for the target (distill_target_stats), reusable by
every alignment step of a batch. A draft step streams the head once more: per vocabulary chunk one GEMM for the
logits, the online softmax kernel (``torch.ops.hass.online_softmax_chunk``), and (when a gradient is needed) one
GEMM accumulating Q flash-attention style. The gradient is therefore finished in the forward pass; backward only
scales it.
"""
from typing import NamedTuple, Optional

import torch

from .. import _library  # noqa: F401  (registers torch.ops.hass.*)
from ._checks import FLOAT_DTYPES, check_tensor, check_topk, describe, flat_loss_mask

DEFAULT_VOCAB_CHUNK = 8192


@torch.library.register_fake("hass::online_softmax_chunk")
def _online_softmax_chunk_fake(logits, state, topk_val, topk_idx, col0, want_exp):
    e = torch.empty_like(logits) if want_exp else logits.new_empty((0,))
    return (e, state.new_empty((logits.shape[0],)), torch.empty_like(state), torch.empty_like(topk_val),
            torch.empty_like(topk_idx))


class DistillTargetStats(NamedTuple):
    """Target-side statistics of fused_linear_distill_loss, computed once per batch (no gradient)."""
    topk_idx: torch.Tensor   # int64 [N, K]: the target's top-K tokens per row
    topk_prob: torch.Tensor  # float32 [N, K]: their target probabilities
    pk: torch.Tensor         # float32 [N]: sum of topk_prob
    lse: torch.Tensor        # float32 [N]: target log-sum-exp
    p_w: torch.Tensor        # float32 [N, H]: sum_v p_v W_v
    pk_w: torch.Tensor       # float32 [N, H]: sum over the top-K of p_v W_v


_MM_OUT_DTYPE_OK = [True]


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, accumulating low-precision products in float32 where torch can."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _MM_OUT_DTYPE_OK[0]:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):  # a torch without the fp32-output GEMM
            _MM_OUT_DTYPE_OK[0] = False
    acc.add_(a @ b)


def _head_chunks(weight: torch.Tensor, chunk: int):
    for c0 in range(0, weight.shape[0], chunk):
        yield c0, weight[c0:c0 + chunk]


def _check_head(hidden, name, weight):
    check_tensor(name, hidden, dtypes=FLOAT_DTYPES, device=weight.device)
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name} must be [..., H] with H = lm_head_weight.shape[1] = {weight.shape[1]}, got "
                         f"{describe(hidden)}")


def _check_weight(weight):
    check_tensor("lm_head_weight", weight, dims=(2,), dtypes=FLOAT_DTYPES)
    if weight.requires_grad:
        raise ValueError("lm_head_weight requires grad, but the fused distillation loss gives the head no gradient "
                         "(HASS keeps the target's lm_head frozen); pass lm_head_weight.detach()")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"lm_head_weight must be a non-empty [V, H] matrix, got {describe(weight)}")


def _check_chunk(chunk_size):
    chunk = DEFAULT_VOCAB_CHUNK if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk


def _row_init(n, device):
    state = torch.empty((n, 2), dtype=torch.float32, device=device)
    state[:, 0] = float("-inf")
    state[:, 1] = 0.0
    return state


@torch.no_grad()
def distill_target_stats(target_hidden: torch.Tensor, lm_head_weight: torch.Tensor, topk: int = 10,
                         chunk_size: Optional[int] = None) -> DistillTargetStats:
    """Target side of fused_linear_distill_loss: one streaming pass over the head (two GEMMs per chunk).

    target_hidden ``[..., H]`` (flattened to N rows), lm_head_weight ``[V, H]`` (frozen; GEMMs run in its
    dtype). Pass the result as ``target_stats=`` to every alignment step of the batch.
    """
    _check_weight(lm_head_weight)
    _check_head(target_hidden, "target_hidden", lm_head_weight)
    V, H = lm_head_weight.shape
    check_topk(topk, V)
    chunk = _check_chunk(chunk_size)
    with torch.autocast(lm_head_weight.device.type, enabled=False):  # GEMMs in the head's dtype
        return _target_stats(target_hidden.reshape(-1, H).to(lm_head_weight.dtype), lm_head_weight, topk, chunk)


def _target_stats(y, lm_head_weight, topk, chunk):
    H = lm_head_weight.shape[1]
    n, dev = y.shape[0], y.device
    state = _row_init(n, dev)
    val = torch.full((n, topk), float("-inf"), dtype=torch.float32, device=dev)
    idx = torch.full((n, topk), -1, dtype=torch.int64, device=dev)
    p_w = torch.zeros((n, H), dtype=torch.float32, device=dev)
    for c0, w in _head_chunks(lm_head_weight, chunk):
        e, alpha, state, val, idx = torch.ops.hass.online_softmax_chunk(y @ w.T, state, val, idx, c0, True)
        p_w.mul_(alpha[:, None])
        _acc_mm(p_w, e, w)
    p_w.div_(state[:, 1:])
    lse = state[:, 0] + state[:, 1].log()
    prob = torch.exp(val - lse[:, None])
    pk_w = torch.empty_like(p_w)
    rows = max(1, (16 << 20) // max(1, topk * H))  # gather at most ~64 MiB of fp32 head rows at a time
    for r0 in range(0, n, rows):
        g = lm_head_weight[idx[r0:r0 + rows]].float()  # [r, K, H]
        pk_w[r0:r0 + rows] = torch.einsum("rk,rkh->rh", prob[r0:r0 + rows], g)
    return DistillTargetStats(idx, prob, prob.sum(-1), lse, p_w, pk_w)


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, stats, ce_weight, topk_weight, chunk, need_grad):
        n, dev = x.shape[0], x.device
        xw = x.to(weight.dtype)
        state = _row_init(n, dev)
        empty_v = torch.empty((n, 0), dtype=torch.float32, device=dev)
        empty_i = torch.empty((n, 0), dtype=torch.int64, device=dev)
        q_w = torch.zeros((n, weight.shape[1]), dtype=torch.float32, device=dev) if need_grad else None
        for c0, w in _head_chunks(weight, chunk):
            e, alpha, state, _, _ = torch.ops.hass.online_softmax_chunk(xw @ w.T, state, empty_v, empty_i, c0,
                                                                        need_grad)
            if need_grad:
                q_w.mul_(alpha[:, None])
                _acc_mm(q_w, e, w)
        lse = state[:, 0] + state[:, 1].log()
        xf = xw.float()
        ce_rows = lse - (xf * stats.p_w).sum(-1)
        topk_rows = stats.pk * lse - (xf * stats.pk_w).sum(-1)
        S = mask.sum() + 1e-5
        ce = (mask * ce_rows).sum() / S
        topk = (mask * topk_rows).sum() / S
        if need_grad:
            q_w.div_(state[:, 1:])
            ctx.save_for_backward(q_w, stats.p_w, stats.pk_w, stats.pk, mask / S)
            ctx.weights = (ce_weight, topk_weight)
            ctx.x_dtype = x.dtype
        return ce_weight * ce + topk_weight * topk, ce, topk

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_topk):
        q_w, p_w, pk_w, pk, scale = ctx.saved_tensors
        ce_weight, topk_weight = ctx.weights
        zero = scale.new_zeros(())
        g_loss = zero if g_loss is None else g_loss.float()
        a = g_loss * ce_weight + (zero if g_ce is None else g_ce.float())
        b = g_loss * topk_weight + (zero if g_topk is None else g_topk.float())
        grad = scale[:, None] * (a * (q_w - p_w) + b * (pk[:, None] * q_w - pk_w))
        return grad.to(ctx.x_dtype), None, None, None, None, None, None, None


def fused_linear_distill_loss(draft_hidden: torch.Tensor, target_hidden: Optional[torch.Tensor],
                              lm_head_weight: torch.Tensor, loss_mask: torch.Tensor, topk: int = 10,
                              ce_weight: float = 0.1, topk_weight: float = 1.0,
                              target_stats: Optional[DistillTargetStats] = None,
                              chunk_size: Optional[int] = None):
    """HASS distillation losses from hidden states through a frozen lm_head, without N x V logits.

    Returns ``(loss, ce_loss, topk_loss)`` with ``loss = ce_weight * ce + topk_weight * topk``; ce and topk are
    exactly those of :func:`distill_loss` applied to ``draft_hidden @ W.T`` and ``target_hidden @ W.T``.
    Differentiable w.r.t. draft_hidden only: lm_head_weight must not require grad (the head is frozen), the
    target side is constant. draft_hidden/target_hidden ``[..., H]``, lm_head_weight ``[V, H]``, loss_mask
    ``[...]`` (float weights, or a bool/integer mask of 0s and 1s, as for distill_loss). The GEMMs run in
    lm_head_weight's dtype, the reductions in float32; memory is O(N * (H + chunk_size)).

    target_stats: the result of :func:`distill_target_stats` for this batch's target_hidden, to share the target
    pass between the alignment steps of one batch (target_hidden may then be None).
    chunk_size: vocabulary columns per GEMM (default 8192).
    """
    _check_weight(lm_head_weight)
    _check_head(draft_hidden, "draft_hidden", lm_head_weight)
    V, H = lm_head_weight.shape
    check_topk(topk, V)
    chunk = _check_chunk(chunk_size)
    x = draft_hidden.reshape(-1, H)
    n = x.shape[0]
    mask = flat_loss_mask(loss_mask, draft_hidden.shape[:-1], lm_head_weight.device)
    if target_stats is None:
        if target_hidden is None:
            raise ValueError("fused_linear_distill_loss needs target_hidden or target_stats")
        if target_hidden.shape != draft_hidden.shape:
            raise ValueError(f"target_hidden must have the shape of draft_hidden {tuple(draft_hidden.shape)}, got "
                             f"{describe(target_hidden)}")
        target_stats = distill_target_stats(target_hidden, lm_head_weight, topk, chunk)
    elif not isinstance(target_stats, DistillTargetStats):
        raise ValueError(f"target_stats must be a DistillTargetStats, got {type(target_stats).__name__}")
    elif tuple(target_stats.topk_idx.shape) != (n, topk) or tuple(target_stats.p_w.shape) != (n, H):
        raise ValueError(f"target_stats was computed for {tuple(target_stats.topk_idx.shape)} top-K rows and "
                         f"{tuple(target_stats.p_w.shape)} head rows; this call needs ({n}, {topk}) and ({n}, {H})")
    need_grad = torch.is_grad_enabled() and draft_hidden.requires_grad
    with torch.autocast(lm_head_weight.device.type, enabled=False):  # GEMMs in the head's dtype
        return _FusedLinearDistill.apply(x, lm_head_weight, mask, target_stats, float(ce_weight),
                                         float(topk_weight), chunk, need_grad)

