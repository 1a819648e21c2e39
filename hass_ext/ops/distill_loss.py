"""distill_loss: the HASS distillation losses (soft cross-entropy and top-K ranking) between logits."""
import torch

from .. import _library  # noqa: F401  (registers torch.ops.hass.*)
from ._checks import FLOAT_DTYPES, check_tensor, check_topk, describe, flat_loss_mask


@torch.library.register_fake("hass::distill_loss")
def _distill_loss_fake(draft_logits, target_logits, loss_mask, topk):
    n = draft_logits.shape[0]
    scalar = draft_logits.new_empty((), dtype=torch.float32)
    return (scalar, scalar.clone(), draft_logits.new_empty((n, 5), dtype=torch.float32),
            draft_logits.new_empty((n, topk), dtype=torch.int64))


@torch.library.register_fake("hass::distill_loss_backward")
def _distill_loss_backward_fake(grad_ce, grad_topk, draft_logits, target_logits, loss_mask, row_stats, topk_idx):
    return torch.empty_like(draft_logits)


def _distill_setup_context(ctx, inputs, output):
    draft_logits, target_logits, loss_mask, _ = inputs
    _, _, row_stats, topk_idx = output
    ctx.save_for_backward(draft_logits, target_logits, loss_mask, row_stats, topk_idx)


def _distill_backward(ctx, grad_ce, grad_topk, _grad_stats, _grad_idx):
    draft_logits, target_logits, loss_mask, row_stats, topk_idx = ctx.saved_tensors
    zero = draft_logits.new_zeros((), dtype=torch.float32)
    grad_ce = zero if grad_ce is None else grad_ce.float()
    grad_topk = zero if grad_topk is None else grad_topk.float()
    grad = torch.ops.hass.distill_loss_backward(grad_ce, grad_topk, draft_logits, target_logits, loss_mask,
                                                row_stats, topk_idx)
    return grad, None, None, None


torch.library.register_autograd("hass::distill_loss", _distill_backward, setup_context=_distill_setup_context)


def distill_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, loss_mask: torch.Tensor,
                 topk: int = 10):
    """HASS losses between draft and target logits, in one pass over each row: returns ``(ce_loss, topk_loss)``.

    With p = softmax(target_logits), log q = log_softmax(draft_logits), m = loss_mask and S = sum(m) + 1e-5:
    ``ce = -sum_t m_t sum_v p log q / S`` and ``topk = -sum_t m_t sum_{v in topK(p_t)} p log q / S`` (the
    top-K terms keep their un-renormalised target probabilities, as in HASS).

    draft_logits, target_logits: ``[..., V]`` float32/bfloat16/float16 (fp32 accumulation).
    loss_mask: ``[...]`` (or ``[..., 1]``): float weights, or a bool or integer (int64/int32/uint8, as tokenizers
        return) mask of 0s and 1s; rows with m = 0 are not read at all.
    topk: K in [1, min(64, V)]. Among equal target logits the lower vocabulary index ranks first.
    Both outputs are float32 scalars, differentiable w.r.t. draft_logits (the target gets no gradient).
    Terms with p = 0 count as 0 even where log q = -inf.
    """
    check_tensor("draft_logits", draft_logits, dtypes=FLOAT_DTYPES)
    device = draft_logits.device
    check_tensor("target_logits", target_logits, dtypes=FLOAT_DTYPES, device=device)
    if draft_logits.dim() < 2:
        raise ValueError(f"draft_logits must be [..., V] with at least 2 dims, got {describe(draft_logits)}")
    if target_logits.shape != draft_logits.shape:
        raise ValueError(f"target_logits must have the shape of draft_logits {tuple(draft_logits.shape)}, got "
                         f"{describe(target_logits)}")
    V = draft_logits.shape[-1]
    if V == 0:
        raise ValueError(f"draft_logits has an empty vocabulary dim: {describe(draft_logits)}")
    check_topk(topk, V)
    mask = flat_loss_mask(loss_mask, draft_logits.shape[:-1], device)
    ce, topk_loss, _, _ = torch.ops.hass.distill_loss(draft_logits.reshape(-1, V),
                                                      target_logits.detach().reshape(-1, V), mask, topk)
    return ce, topk_loss
