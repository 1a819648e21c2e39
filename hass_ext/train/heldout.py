"""Held-out evaluation of a draft during training: k-step greedy acceptance and the per-step losses.

k-step acceptance (the reference's ``getkacc``, computed for all start positions at once with the alignment
forward): a chain starts at every trained position s whose token x_{s+1} is the target's greedy choice; its step
i (i = 0..k-1) is the draft's i-th greedy proposal after the verified prefix ending at s, made from the draft's own
earlier feature predictions (alignment step i+1 at row s+i). ``acc[i]`` = chains whose first i+1 proposals all
equal the target's greedy tokens / chains started (a chain also stops, uncounted, where the data leaves the
target's greedy path, since teacher-forced tokens would no longer match what the draft proposed). The sum of
``acc`` is the expected number of accepted draft tokens of a greedy chain of length k (tau - 1 for a chain draft).
"""
from typing import Dict, List

import torch

from .align import alignment_steps
from .loss import step_loss, target_stats


def _argmax_logits(hidden: torch.Tensor, weight: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """argmax over the vocabulary of ``hidden [..., H] @ weight.T`` without holding all the logits."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for a in range(0, flat.shape[0], chunk):
        out[a:a + chunk] = (flat[a:a + chunk].to(weight.dtype) @ weight.t()).argmax(-1)
    return out.view(hidden.shape[:-1])


def _shift(x: torch.Tensor, i: int) -> torch.Tensor:
    """x[:, t + i] at column t (False past the end)."""
    if i == 0:
        return x
    out = torch.zeros_like(x)
    out[:, :-i] = x[:, i:]
    return out


@torch.no_grad()
def evaluate_batch(draft, lm_head_weight: torch.Tensor, pairs: Dict[str, torch.Tensor], k: int, loss_steps: int,
                   attention: str = "proper", topk: int = 10, weights=(1.0, 0.1, 1.0), target_head=None,
                   vocab_ids=None) -> Dict[str, List[float]]:
    """Counts for one batch of training pairs (loss.training_pairs): chains correct/total per step, and
    the summed losses of alignment steps 1..loss_steps (un-noised features).

    lm_head_weight: the head of the losses and of the draft's proposals. With a hot vocabulary that is its rows
    only: ``vocab_ids`` maps them to token ids and ``target_head`` is the full head, which gives the target's
    real greedy tokens (a token outside the hot set is a miss, as at decode time).
    """
    ids, feat, target, mask = pairs["input_ids"], pairs["features"], pairs["target"], pairs["loss_mask"] > 0
    full = lm_head_weight if target_head is None else target_head
    g_next = _argmax_logits(target, full)                    # target's greedy token after f_{t+1}: x_{t+2}
    g_cur = _argmax_logits(feat, full)                       # target's greedy token after f_t: x_{t+1}
    to_ids = (lambda c: c) if vocab_ids is None else (lambda c: vocab_ids.to(c.device)[c])  # noqa: E731
    ok = mask & (ids == g_cur)                               # step may run here (prefix is the greedy path)
    steps = max(k, loss_steps)
    correct, total = [0] * k, [0] * k
    losses = {"loss": [0.0] * loss_steps, "tokens": [0] * loss_steps}
    stats = target_stats(target, pairs["loss_mask"], lm_head_weight, topk)
    alive = torch.ones_like(ok)
    failed = torch.zeros(ok.shape[0], device=ok.device, dtype=torch.long)
    for i, pred in enumerate(alignment_steps(draft, ids, feat, steps, attention=attention)):
        if i < loss_steps:
            loss, parts = step_loss(pred, target, pairs["loss_mask"], lm_head_weight, topk, *weights, stats=stats)
            losses["loss"][i] += float(loss) * parts["tokens"]
            losses["tokens"][i] += parts["tokens"]
        if i < k:
            hit = to_ids(_argmax_logits(pred, lm_head_weight)) == g_next
            started = alive & _shift(ok, i)
            good = started & _shift(hit, i)
            total[i] += int(started.sum()) + int(failed.sum())
            correct[i] += int(good.sum())
            failed = failed + (started & ~good).sum(1)
            alive = good
    return {"correct": correct, "total": total, **losses}


def merge_counts(acc: Dict[str, list], new: Dict[str, list]) -> Dict[str, list]:
    if not acc:
        return {key: list(v) for key, v in new.items()}
    return {key: [a + b for a, b in zip(acc[key], new[key])] for key, v in acc.items()}


def summarize(counts: Dict[str, list]) -> Dict[str, object]:
    """Rates from summed counts; a rate with nothing counted (no chain reached that step, no loss token) is None,
    not 0: nothing was measured."""
    acc = [c / t if t else None for c, t in zip(counts["correct"], counts["total"])]
    loss = [s / n if n else None for s, n in zip(counts["loss"], counts["tokens"])]
    chains = int(counts["total"][0]) if counts["total"] else 0
    return {"acc": acc, "accepted_per_chain": sum(a for a in acc if a is not None) if chains else None,
            "loss_per_step": loss, "chains": chains, "tokens": int(counts["tokens"][0]) if counts["tokens"] else 0}
