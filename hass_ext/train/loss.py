"""The draft's training pairs and its per-step loss (the HASS / EAGLE objective).

Pairs (the EAGLE shift): for an example of tokens x_0..x_{n-1} with target features f_0..f_{n-1}, training
position t (t = 0..n-2) feeds the draft (f_t, x_{t+1}) and asks for f_{t+1}; the target's distribution
p_t = softmax(W_lm f_{t+1}) is the distribution of token x_{t+2}.

Loss-mask alignment (the data stores the "token" convention: m[t] = 1 iff x_t is an assistant token):
- "predicted" (default): position t is trained iff the token it predicts, x_{t+2}, is an assistant token,
  i.e. mask[t] = m[t+2]. At decode time the draft proposes exactly the tokens after the verified ones, so every
  assistant token the draft could be asked for is trained and nothing after the end of a turn is.
- "reference": mask[t] = m[t] (the reference scripts), which trains predictions shifted by two tokens relative
  to the assistant span (the first answer tokens are not trained, two tokens after the turn are).

Step loss: L = v_w * SmoothL1(f̂, f_{t+1}) + p_w * CE(p, q) + topk_w * TopK-CE(p, q), each a masked mean over
positions (sum / (Σ mask + 1e-5)); SmoothL1 is averaged over the hidden dimension (β = 1). The two distillation
terms come from fused_linear_distill_loss, which streams the frozen lm_head over the vocabulary (no N x V logits);
the target side (softmax statistics, top-K) is computed once per batch and shared by the J steps.
"""
from typing import Dict

import torch
import torch.nn.functional as F

from ..ops import distill_target_stats, fused_linear_distill_loss

MASK_ALIGNMENTS = ("predicted", "reference")


def training_pairs(batch: Dict[str, torch.Tensor], mask_alignment: str = "predicted") -> Dict[str, torch.Tensor]:
    """Shift a collated batch (shards.collate) into draft inputs/targets of length L-1.

    Returns input_ids [B, L-1] (x_{t+1}), features [B, L-1, H] (f_t), target [B, L-1, H] (f_{t+1}),
    loss_mask [B, L-1] float, lengths [B] (the examples' token counts, before the shift).
    """
    if mask_alignment not in MASK_ALIGNMENTS:
        raise ValueError(f"mask_alignment must be one of {MASK_ALIGNMENTS}, got {mask_alignment!r}")
    ids, hid, m, att = batch["input_ids"], batch["hidden_states"], batch["loss_mask"], batch["attention_mask"]
    if ids.shape[1] < 2:
        raise ValueError(f"training needs sequences of at least 2 tokens, got a batch of length {ids.shape[1]}")
    valid_target = att[:, 1:]  # f_{t+1} exists
    if mask_alignment == "predicted":
        mask = torch.zeros_like(m[:, 1:])
        mask[:, :-1] = m[:, 2:]
    else:
        mask = m[:, :-1]
    mask = mask * valid_target.to(mask.dtype)
    return {"input_ids": ids[:, 1:], "features": hid[:, :-1], "target": hid[:, 1:], "loss_mask": mask,
            "lengths": att.sum(1)}


def uniform_noise(features: torch.Tensor, lengths: torch.Tensor, std: float, scale_by_length: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """The reference's feature noise: f + (U[0,1) - 0.5) * std * s, s = 512 / n (n = the example's length)
    with ``scale_by_length`` (the reference behaviour), else s = 1."""
    u = torch.rand(features.shape, generator=generator, dtype=torch.float32).to(features.device)
    amp = torch.full((features.shape[0],), float(std), device=features.device)
    if scale_by_length:
        amp = amp * 512.0 / lengths.to(device=features.device, dtype=torch.float32).clamp(min=1)
    return features + (u - 0.5) * amp[:, None, None].to(features.dtype)


def target_stats(target: torch.Tensor, loss_mask: torch.Tensor, lm_head_weight: torch.Tensor, topk: int = 10):
    """The target side of the distillation loss for the trained positions, shared by all alignment steps of a
    batch (one pass over the head instead of one per step). None when no position is trained."""
    rows = loss_mask > 0
    if not bool(rows.any()):
        return None
    return distill_target_stats(target[rows], lm_head_weight, topk)


def step_loss(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor, lm_head_weight: torch.Tensor,
              topk: int = 10, v_w: float = 1.0, p_w: float = 0.1, topk_w: float = 1.0, stats=None):
    """One alignment step's loss and its parts (floats, for logging).

    stats: ``target_stats(target, loss_mask, lm_head_weight, topk)`` of this batch, computed here when None.
    """
    rows = loss_mask > 0
    n = int(rows.sum())
    if n == 0:  # nothing to train in this batch: a zero that still reaches every parameter
        zero = pred.sum() * 0.0
        return zero, {"v": 0.0, "ce": 0.0, "topk": 0.0, "tokens": 0}
    if stats is None:
        stats = target_stats(target, loss_mask, lm_head_weight, topk)
    p, t = pred[rows], target[rows]
    w = loss_mask[rows].float()
    denom = w.sum() + 1e-5
    lv = (F.smooth_l1_loss(p.float(), t.float(), reduction="none").mean(-1) * w).sum() / denom
    ld, ce, tk = fused_linear_distill_loss(p, None, lm_head_weight, w, topk, p_w, topk_w, target_stats=stats)
    loss = v_w * lv + ld
    return loss, {"v": float(lv.detach()), "ce": float(ce.detach()), "topk": float(tk.detach()), "tokens": n}
