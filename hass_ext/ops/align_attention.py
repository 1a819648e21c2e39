"""align_attention: the attention of HASS harmonized context alignment (training), with its backward."""
from typing import Optional

import torch

from .. import _library  # noqa: F401  (registers torch.ops.hass.*)
from ._checks import check_attention_qkv, describe, softmax_scale

# "proper": a masked softmax over the visible keys; "reference": the upstream HASS training code's leaky softmax.
ALIGN_ATTENTION_MODES = ("proper", "reference")


@torch.library.register_fake("hass::align_attention")
def _align_attention_fake(q, k_levels, v_levels, scale, leaky):
    B, Hq, T, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B, Hq, T), dtype=torch.float32))


@torch.library.register_fake("hass::align_attention_backward")
def _align_attention_backward_fake(grad_out, q, k_levels, v_levels, out, lse, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k_levels, memory_format=torch.contiguous_format),
            torch.empty_like(v_levels, memory_format=torch.contiguous_format))


def _align_setup_context(ctx, inputs, output):
    q, k_levels, v_levels, scale, _leaky = inputs
    out, lse = output
    ctx.save_for_backward(q, k_levels, v_levels, out, lse)
    ctx.scale = scale


def _align_backward(ctx, grad_out, _grad_lse):
    # lse is an internal output (never returned by align_attention), so its gradient is always zero.
    q, k_levels, v_levels, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.hass.align_attention_backward(grad_out, q, k_levels, v_levels, out, lse, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("hass::align_attention", _align_backward, setup_context=_align_setup_context)


def align_attention(q: torch.Tensor, k_levels, v_levels, scale: Optional[float] = None,
                    semantics: str = "proper") -> torch.Tensor:
    """Attention of HASS harmonized context alignment at step F (differentiable w.r.t. q, k_levels, v_levels).

    q: ``[B, Hq, T, d]``, the queries of step F. k_levels, v_levels: ``[F, B, Hkv, T, d]`` (or a list of F
        tensors ``[B, Hkv, T, d]``, stacked here with a copy): level 0 from the target features, level i from the
        draft's step-i features. Hq a multiple of Hkv; fp32, bf16 or fp16; any head_dim on CPU, 64/128 on CUDA.
    Query t attends the level-0 keys ``c <= t-(F-1)`` and, for i = 1..F-1, the single level-i key
    ``c = t-(F-1)+i`` when ``c >= 0`` (the last level's key is at column t itself, so no row is empty).
    semantics: one of ALIGN_ATTENTION_MODES. "proper" (default) is a masked softmax over exactly those keys.
        "reference" reproduces the upstream HASS training code's leaky normalisation: the T-1-t masked-out
        columns stay in the softmax denominator with logit 0, so row weights sum to less than 1.
    The work is one causal-with-offset block plus F-1 row-wise dot products merged by log-sum-exp; no T x T score
    matrix is formed. Right-padded batches are safe: a padded key at position c is seen only by queries t >= c,
    which are padding too (mask their losses); with "reference" semantics padding columns add to the leak, as in
    the HASS code. Returns ``[B, Hq, T, d]`` in q's dtype.
    """
    if isinstance(k_levels, (list, tuple)):
        k_levels = torch.stack(list(k_levels))
    if isinstance(v_levels, (list, tuple)):
        v_levels = torch.stack(list(v_levels))
    if semantics not in ALIGN_ATTENTION_MODES:
        raise ValueError(f"semantics must be one of {ALIGN_ATTENTION_MODES}, got {semantics!r}")
    check_attention_qkv("align_attention", q, k_levels, v_levels, k_name="k_levels", v_name="v_levels",
                        kv_dims=5)
    T = q.shape[2]
    if k_levels.shape[0] < 1:
        raise ValueError(f"k_levels must hold at least one level (F >= 1), got {describe(k_levels)}")
    if k_levels.shape[3] != T:
        raise ValueError(f"k_levels must be [F, B, Hkv, T={T}, d] with the query length T of q {tuple(q.shape)}, "
                         f"got {describe(k_levels)}")
    out, _ = torch.ops.hass.align_attention(q, k_levels, v_levels, softmax_scale(scale, q.shape[-1]),
                                            semantics == "reference")
    return out
