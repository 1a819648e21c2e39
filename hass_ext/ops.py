"""Python entry points of the hass kernels (torch.ops.hass.*): input validation and fake implementations.

Each wrapper checks its inputs and raises ValueError naming the argument, its shape/dtype and what was
expected; the kernels themselves live in csrc/ (CPU) and csrc/cuda (CUDA). Oracles: hass_ext/reference.py.
"""
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import _library  # noqa: F401  (registers the ops)
from .sampling import check_sampling_args

_INDEX_DTYPES = (torch.int64,)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, *, dims=None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {_describe(t)}")


# ---- compact_kv -------------------------------------------------------------------------------------------

@torch.library.register_fake("hass::compact_kv")
def _compact_kv_fake(caches, src_slots, dst_start):
    return None


def compact_kv(caches: Union[torch.Tensor, Sequence[torch.Tensor]], src_slots, dst_start) -> None:
    """Move the accepted tree entries of every KV cache into contiguous slots, in place, in one call.

    caches: one tensor or a list of tensors, each ``[B, H, S, D]`` (one layer's K or V) or
        ``[lead, B, H, S, D]`` (all layers stacked, e.g. lead = 2 * layers). Any float dtype; last dim contiguous.
    src_slots: int64 ``[m]`` or ``[B, m]``: the cache slots of the accepted entries, in order; ``-1`` pads
        rows of a ragged batch (padding only after the valid entries).
    dst_start: int or int64 ``[B]``: the first destination slot of each batch row.
    After the call, ``cache[..., b, :, dst_start[b] + i, :]`` holds what ``cache[..., b, :, src_slots[b, i], :]``
    held before, for every valid i; sources and destinations may overlap. Other slots are unchanged.
    """
    if isinstance(caches, torch.Tensor):
        caches = [caches]
    caches = list(caches)
    if not caches:
        raise ValueError("compact_kv: caches is empty")
    device = caches[0].device
    for i, c in enumerate(caches):
        _check_tensor(f"caches[{i}]", c, dims=(4, 5), device=device)
        if not c.is_floating_point():
            raise ValueError(f"caches[{i}] must be a floating-point tensor, got {_describe(c)}")
        if c.stride(-1) != 1:
            raise ValueError(f"caches[{i}] must be contiguous in its last dim, got strides {c.stride()}")
    if not isinstance(src_slots, torch.Tensor):
        src_slots = torch.as_tensor(src_slots, dtype=torch.int64, device=device)
    _check_tensor("src_slots", src_slots, dims=(1, 2), dtypes=_INDEX_DTYPES, device=device)
    B = caches[0].shape[caches[0].dim() - 4]
    if src_slots.dim() == 1:  # the same plan for every batch row
        src_slots = src_slots.unsqueeze(0).expand(B, -1)
    B = src_slots.shape[0]
    for i, c in enumerate(caches):
        cb = c.shape[c.dim() - 4]
        if cb != B:
            raise ValueError(f"caches[{i}] has batch {cb} but src_slots has {B} rows ({_describe(c)})")
    if isinstance(dst_start, int):
        dst_start = torch.full((B,), dst_start, dtype=torch.int64, device=device)
    _check_tensor("dst_start", dst_start, dims=(1,), dtypes=_INDEX_DTYPES, device=device)
    if dst_start.shape[0] != B:
        raise ValueError(f"dst_start must have {B} entries (one per batch row), got {_describe(dst_start)}")
    torch.ops.hass.compact_kv(caches, src_slots, dst_start)


# ---- verify_tree ------------------------------------------------------------------------------------------

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.register_fake("hass::verify_tree")
def _verify_tree_fake(target_logits, draft_tokens, parents, temperature=0.0, top_p=1.0, top_k=0, uniforms=None,
                      generator=None):
    B, n = draft_tokens.shape
    return draft_tokens.new_empty((B, n)), draft_tokens.new_empty((B,)), draft_tokens.new_empty((B,))


def verify_tree(target_logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor,
                temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator = None, uniforms: torch.Tensor = None):
    """Decide in one call which drafted tokens of a token tree the target accepts (lossless speculative sampling).

    target_logits: ``[B, n, V]`` (or ``[n, V]``) float32/bfloat16/float16, the target's logits at the n tree
        nodes; node 0 is the root (the last committed token). The last dim must be contiguous (else copied).
    draft_tokens: int64 ``[B, n]`` (or ``[n]``), the token of each node (entry 0 is ignored).
    parents: int64 ``[B, n]`` (or ``[n]``), ``parents[:, 0] == -1`` and ``0 <= parents[:, i] < i``.
    temperature, top_p, top_k: the target distribution of hass_ext.sampling (temperature 0 = greedy).
    generator: torch.Generator of the tensors' device (default generator when None). CPU: ``[B, n]`` uniforms
        are drawn from it with torch.rand; CUDA: a Philox seed/offset is taken from it (graph-capturable).
    uniforms: optional float32 ``[B, n]`` in [0, 1) replacing the generator: ``uniforms[:, c]`` decides child
        node c when it is tried, ``uniforms[:, 0]`` draws the final token (tests use it to share a stream).

    Returns ``(accepted, accept_len, next_token)``: ``accepted [B, n]`` int64 node indices of the accepted path
    (starting with 0, padded with -1), ``accept_len [B]`` accepted draft tokens (root excluded), ``next_token
    [B]`` the bonus/correction token drawn from the target at the end of the path.

    Rule (children of a node are tried in node-index order): T = 0 follows the first child whose token is the
    argmax (ties: lowest id); next_token is the argmax at the last node. T > 0 accepts child token x with
    probability p(x), on rejection sets p(x) = 0 and renormalises before the next sibling (siblings repeating a
    rejected token are skipped); next_token is drawn from the residual, or from p at the end of the path.
    Every path uses the same temperature/top-k/top-p distribution, the final draw included.

    Errors (ValueError): malformed tree, token ids outside [0, V), shape/dtype/device mismatches, bad sampling
    arguments, and a NaN or +Inf logit (or no finite logit) in the row of a node the walk visits (-inf logits
    are allowed: probability 0). On CUDA, value errors are found in the kernel and raised after it (one status
    read); under CUDA graph capture nothing is read and such rows come back as -1.
    """
    check_sampling_args(temperature, top_p, top_k)
    _check_tensor("target_logits", target_logits, dims=(2, 3), dtypes=_LOGIT_DTYPES)
    device = target_logits.device
    unbatched = target_logits.dim() == 2
    want = 1 if unbatched else 2
    _check_tensor("draft_tokens", draft_tokens, dims=(want,), dtypes=_INDEX_DTYPES, device=device)
    _check_tensor("parents", parents, dims=(want,), dtypes=_INDEX_DTYPES, device=device)
    if unbatched:
        target_logits, draft_tokens, parents = target_logits[None], draft_tokens[None], parents[None]
    B, n, V = target_logits.shape
    if n < 1 or V < 1:
        raise ValueError(f"target_logits needs at least one node and one token, got {_describe(target_logits)}")
    for name, t in (("draft_tokens", draft_tokens), ("parents", parents)):
        if tuple(t.shape) != (B, n):
            raise ValueError(f"{name} must have shape {(B, n)} to match target_logits [B, n, V], got {_describe(t)}")
    if uniforms is not None:
        _check_tensor("uniforms", uniforms, dims=(want,), dtypes=(torch.float32,), device=device)
        uniforms = uniforms[None] if unbatched else uniforms
        if tuple(uniforms.shape) != (B, n):
            raise ValueError(f"uniforms must have shape {(B, n)}, got {_describe(uniforms)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the tensors are on {device}")
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    accepted, accept_len, next_token = torch.ops.hass.verify_tree(
        target_logits, draft_tokens, parents, float(temperature), float(top_p), int(top_k), uniforms, generator)
    if unbatched:
        return accepted[0], accept_len[0], next_token[0]
    return accepted, accept_len, next_token


# ---- tree_attention ---------------------------------------------------------------------------------------

_ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TREE_NODES = 1024  # csrc/include/hass/attention.h kMaxTreeNodes
_CUDA_HEAD_DIMS = (64, 128)


def _check_attention_qkv(op: str, q, k, v, q_name="q", k_name="k", v_name="v", kv_dims=4):
    _check_tensor(q_name, q, dims=(4,), dtypes=_ATTN_DTYPES)
    _check_tensor(k_name, k, dims=(kv_dims,), dtypes=(q.dtype,), device=q.device)
    _check_tensor(v_name, v, dims=(kv_dims,), dtypes=(q.dtype,), device=q.device)
    if k.shape != v.shape:
        raise ValueError(f"{op}: {k_name} and {v_name} must have the same shape, got {_describe(k)} and {_describe(v)}")
    B, Hq, _, d = q.shape
    kB, Hkv, _, kd = k.shape[-4:]
    if kB != B or kd != d:
        raise ValueError(f"{op}: {k_name} must be [..., B={B}, Hkv, L, d={d}] to match {q_name} "
                         f"{tuple(q.shape)}, got {_describe(k)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: the query heads ({Hq}, {q_name}.shape[1]) must be a multiple of the key/value "
                         f"heads ({Hkv}, {k_name}.shape[{kv_dims - 3}]) (grouped-query attention)")
    if q.device.type == "cuda" and d not in _CUDA_HEAD_DIMS:
        raise ValueError(f"{op}: the CUDA kernel supports head_dim {' or '.join(map(str, _CUDA_HEAD_DIMS))}, "
                         f"got {q_name} {_describe(q)}")


def _default_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return scale


@torch.library.register_fake("hass::tree_attention")
def _tree_attention_fake(q, k, v, tree_mask, prefix_lens, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor,
                   scale: Optional[float] = None, prefix_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the n tree nodes over the committed prefix and their own ancestors (tree verification).

    q: ``[B, Hq, n, d]``, the queries of the n tree nodes. k, v: ``[B, Hkv, L, d]``, whose last n entries are the
        tree nodes (their keys/values already written), the first ``L - n`` the committed prefix.
        Hq must be a multiple of Hkv (grouped-query attention). fp32, bf16 or fp16 (all the same dtype);
        any head_dim on CPU, 64 or 128 on CUDA. Strided views (e.g. a slice of a preallocated cache) are fine.
    tree_mask: bool ``[B, n, n]`` (or ``[n, n]``, shared by the batch): ``tree_mask[b, i, j]`` is true where tree
        node j is an ancestor of node i or i itself. n <= 1024.
    scale: the softmax scale, default ``1/sqrt(d)``.
    prefix_lens: optional int64 ``[B]`` for a batch with prefixes of different lengths, each right-padded to
        ``L - n``: row b sees prefix keys ``[0, prefix_lens[b])`` only. Values must lie in ``[0, L - n]``
        (checked on CPU; clamped into that range by the CUDA kernel, which does not synchronise to check).
    Returns ``[B, Hq, n, d]`` in q's dtype: row i attends every visible prefix key and the tree keys j with
    ``tree_mask[b, i, j]``, with one softmax over both. A batch of trees of different sizes is padded to a common
    n: padding nodes (mask rows and columns false for real nodes) are never seen by real nodes, and their own
    outputs are whatever their mask rows say (a row with no visible key at all gives zeros).
    """
    _check_attention_qkv("tree_attention", q, k, v)
    B, Hq, n, d = q.shape
    L = k.shape[2]
    _check_tensor("tree_mask", tree_mask, dims=(2, 3), dtypes=(torch.bool,), device=q.device)
    if tree_mask.dim() == 2:
        tree_mask = tree_mask.unsqueeze(0).expand(B, n, n)
    if tuple(tree_mask.shape) != (B, n, n):
        raise ValueError(f"tree_mask must be [B, n, n] = [{B}, {n}, {n}] for q {tuple(q.shape)}, "
                         f"got {_describe(tree_mask)}")
    if n > L:
        raise ValueError(f"k/v must hold the prefix and the n = {n} tree nodes, but L = {L} < n ({_describe(k)})")
    if n > MAX_TREE_NODES:
        raise ValueError(f"tree_attention supports trees of at most {MAX_TREE_NODES} nodes, got n = {n} "
                         f"(q {_describe(q)})")
    if prefix_lens is not None:
        _check_tensor("prefix_lens", prefix_lens, dims=(1,), dtypes=_INDEX_DTYPES, device=q.device)
        if prefix_lens.shape[0] != B:
            raise ValueError(f"prefix_lens must have {B} entries (one per batch row), got {_describe(prefix_lens)}")
        if prefix_lens.device.type == "cpu" and prefix_lens.numel() and (
                int(prefix_lens.min()) < 0 or int(prefix_lens.max()) > L - n):
            raise ValueError(f"prefix_lens values must lie in [0, L - n] = [0, {L - n}], got "
                             f"{prefix_lens.tolist()}")
    return torch.ops.hass.tree_attention(q, k, v, tree_mask, prefix_lens, _default_scale(scale, d))


# ---- align_attention --------------------------------------------------------------------------------------

_ALIGN_SEMANTICS = ("proper", "reference")


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
    semantics: "proper" (default) is a masked softmax over exactly those keys. "reference" reproduces the HASS
        training code's leaky normalisation (hass-reference.md P-1): the T-1-t masked-out columns stay in the
        softmax denominator with logit 0, so row weights sum to less than 1.
    The work is one causal-with-offset block plus F-1 row-wise dot products merged by log-sum-exp; no T x T score
    matrix is formed. Right-padded batches are safe: a padded key at position c is seen only by queries t >= c,
    which are padding too (mask their losses); with "reference" semantics padding columns add to the leak, as in
    the HASS code. Returns ``[B, Hq, T, d]`` in q's dtype.
    """
    if isinstance(k_levels, (list, tuple)):
        k_levels = torch.stack(list(k_levels))
    if isinstance(v_levels, (list, tuple)):
        v_levels = torch.stack(list(v_levels))
    if semantics not in _ALIGN_SEMANTICS:
        raise ValueError(f"semantics must be one of {_ALIGN_SEMANTICS}, got {semantics!r}")
    _check_attention_qkv("align_attention", q, k_levels, v_levels, k_name="k_levels", v_name="v_levels",
                         kv_dims=5)
    T = q.shape[2]
    if k_levels.shape[0] < 1:
        raise ValueError(f"k_levels must hold at least one level (F >= 1), got {_describe(k_levels)}")
    if k_levels.shape[3] != T:
        raise ValueError(f"k_levels must be [F, B, Hkv, T={T}, d] with the query length T of q {tuple(q.shape)}, "
                         f"got {_describe(k_levels)}")
    out, _ = torch.ops.hass.align_attention(q, k_levels, v_levels, _default_scale(scale, q.shape[-1]),
                                            semantics == "reference")
    return out


# ---- distill_loss (HASS top-K ranking distillation) --------------------------------------------------------

_LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_TOPK = 64


@torch.library.register_fake("hass::distill_loss")
def _distill_loss_fake(draft_logits, target_logits, loss_mask, topk):
    n = draft_logits.shape[0]
    scalar = draft_logits.new_empty((), dtype=torch.float32)
    return (scalar, scalar.clone(), draft_logits.new_empty((n, 5), dtype=torch.float32),
            draft_logits.new_empty((n, topk), dtype=torch.int64))


@torch.library.register_fake("hass::distill_loss_backward")
def _distill_loss_backward_fake(grad_ce, grad_topk, draft_logits, target_logits, loss_mask, row_stats, topk_idx):
    return torch.empty_like(draft_logits)


@torch.library.register_fake("hass::online_softmax_chunk")
def _online_softmax_chunk_fake(logits, state, topk_val, topk_idx, col0, want_exp):
    e = torch.empty_like(logits) if want_exp else logits.new_empty((0,))
    return (e, state.new_empty((logits.shape[0],)), torch.empty_like(state), torch.empty_like(topk_val),
            torch.empty_like(topk_idx))


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


def _check_topk(topk, vocab: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= min(_MAX_TOPK, vocab):
        raise ValueError(f"topk must be an int in [1, min({_MAX_TOPK}, vocab size {vocab})], got {topk!r}")


def _flat_mask(loss_mask, lead_shape, device, name="loss_mask") -> torch.Tensor:
    """loss_mask [...] (or [..., 1]) matching lead_shape, float or bool -> float32 [N]."""
    _check_tensor(name, loss_mask, device=device)
    shape = tuple(loss_mask.shape)
    if shape != tuple(lead_shape) and shape != tuple(lead_shape) + (1,):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (or with a trailing 1), got "
                         f"{_describe(loss_mask)}")
    if not (loss_mask.is_floating_point() or loss_mask.dtype == torch.bool):
        raise ValueError(f"{name} must be a float or bool tensor, got {_describe(loss_mask)}")
    return loss_mask.detach().reshape(-1).to(torch.float32).contiguous()


def distill_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, loss_mask: torch.Tensor,
                 topk: int = 10):
    """HASS losses between draft and target logits, in one pass over each row: returns ``(ce_loss, topk_loss)``.

    With p = softmax(target_logits), log q = log_softmax(draft_logits), m = loss_mask and S = sum(m) + 1e-5:
    ``ce = -sum_t m_t sum_v p log q / S`` and ``topk = -sum_t m_t sum_{v in topK(p_t)} p log q / S`` (the
    top-K terms keep their un-renormalised target probabilities, as in HASS).

    draft_logits, target_logits: ``[..., V]`` float32/bfloat16/float16 (fp32 accumulation).
    loss_mask: ``[...]`` (or ``[..., 1]``), float or bool; rows with m = 0 are not read at all.
    topk: K in [1, min(64, V)]. Among equal target logits the lower vocabulary index ranks first.
    Both outputs are float32 scalars, differentiable w.r.t. draft_logits (the target gets no gradient).
    Terms with p = 0 count as 0 even where log q = -inf.
    """
    _check_tensor("draft_logits", draft_logits, dtypes=_LOSS_DTYPES)
    device = draft_logits.device
    _check_tensor("target_logits", target_logits, dtypes=_LOSS_DTYPES, device=device)
    if draft_logits.dim() < 2:
        raise ValueError(f"draft_logits must be [..., V] with at least 2 dims, got {_describe(draft_logits)}")
    if target_logits.shape != draft_logits.shape:
        raise ValueError(f"target_logits must have the shape of draft_logits {tuple(draft_logits.shape)}, got "
                         f"{_describe(target_logits)}")
    V = draft_logits.shape[-1]
    if V == 0:
        raise ValueError(f"draft_logits has an empty vocabulary dim: {_describe(draft_logits)}")
    _check_topk(topk, V)
    mask = _flat_mask(loss_mask, draft_logits.shape[:-1], device)
    ce, topk_loss, _, _ = torch.ops.hass.distill_loss(draft_logits.reshape(-1, V),
                                                      target_logits.detach().reshape(-1, V), mask, topk)
    return ce, topk_loss


# ---- fused_linear_distill_loss: the loss straight from hidden states, never holding N x V logits -----------
#
# The head is linear, so every vocabulary sum collapses to an H-vector per row (W_v = row v of the head):
#   sum_v p_v z_v = <x, P>,           P   = sum_v p_v W_v              (target side only: p_w)
#   sum_{v in K} p_v z_v = <x, P_K>,  P_K = sum_{v in K} p_v W_v       (target side only: pk_w)
#   ce_row = lse(z) - <x, P>,  topk_row = pk lse(z) - <x, P_K>,  pk = sum_{v in K} p_v
#   dce/dx = (m/S) (Q - P),  dtopk/dx = (m/S) (pk Q - P_K),  Q = sum_v q_v W_v = softmax(x W^T) W
# P, P_K and the top-K come from one streaming pass over the head for the target (distill_target_stats),
# reusable by every alignment step of a batch. A draft step streams the head once more: per vocabulary chunk
# one GEMM for the logits, the online softmax kernel, and (when a gradient is needed) one GEMM accumulating Q
# flash-attention style. The gradient is therefore finished in the forward pass; backward only scales it.

DEFAULT_VOCAB_CHUNK = 8192


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
    _check_tensor(name, hidden, dtypes=_LOSS_DTYPES, device=weight.device)
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name} must be [..., H] with H = lm_head_weight.shape[1] = {weight.shape[1]}, got "
                         f"{_describe(hidden)}")


def _check_weight(weight):
    _check_tensor("lm_head_weight", weight, dims=(2,), dtypes=_LOSS_DTYPES)
    if weight.requires_grad:
        raise ValueError("lm_head_weight requires grad, but the fused distillation loss gives the head no gradient "
                         "(HASS keeps the target's lm_head frozen); pass lm_head_weight.detach()")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"lm_head_weight must be a non-empty [V, H] matrix, got {_describe(weight)}")


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
    _check_topk(topk, V)
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
    ``[...]``. The GEMMs run in lm_head_weight's dtype, the reductions in float32; memory is
    O(N * (H + chunk_size)).

    target_stats: the result of :func:`distill_target_stats` for this batch's target_hidden, to share the target
    pass between the alignment steps of one batch (target_hidden may then be None).
    chunk_size: vocabulary columns per GEMM (default 8192).
    """
    _check_weight(lm_head_weight)
    _check_head(draft_hidden, "draft_hidden", lm_head_weight)
    V, H = lm_head_weight.shape
    _check_topk(topk, V)
    chunk = _check_chunk(chunk_size)
    x = draft_hidden.reshape(-1, H)
    n = x.shape[0]
    mask = _flat_mask(loss_mask, draft_hidden.shape[:-1], lm_head_weight.device)
    if target_stats is None:
        if target_hidden is None:
            raise ValueError("fused_linear_distill_loss needs target_hidden or target_stats")
        if target_hidden.shape != draft_hidden.shape:
            raise ValueError(f"target_hidden must have the shape of draft_hidden {tuple(draft_hidden.shape)}, got "
                             f"{_describe(target_hidden)}")
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


# ---- small_linear -----------------------------------------------------------------------------------------

@torch.library.register_fake("hass::small_linear")
def _small_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def wants_grad(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a few rows on a CPU, as memory-bound as one row (float32; inference only).

    x: ``[..., K]`` float32 on the CPU, a handful of rows (a decode step, a tree verification; past ~32 rows a
    BLAS GEMM is faster: see ``hass_ext.cpu_linear``). weight: ``[N, K]`` float32 or bfloat16 (nn.Linear
    layout); a bfloat16 weight is widened exactly, so the result equals the float32 product with
    ``weight.float()`` bit for bit, for half the bytes read. bias: ``[N]`` float32 or None. Returns ``[..., N]``
    float32.

    Each weight row is read once for all rows of x, and each output is summed in a fixed order whatever the
    number of rows, so a tree node's result is bit-identical to a one-token step over the same input. No autograd:
    use torch.nn.functional.linear for training.
    """
    _check_tensor("x", x, dtypes=(torch.float32,), device=torch.device("cpu"))
    _check_tensor("weight", weight, dims=(2,), dtypes=(torch.float32, torch.bfloat16), device=torch.device("cpu"))
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., {weight.shape[1]}] to match weight {tuple(weight.shape)}, got {_describe(x)}")
    if bias is not None:
        _check_tensor("bias", bias, dims=(1,), dtypes=(torch.float32,), device=torch.device("cpu"))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} entries (weight rows), got {_describe(bias)}")
    if wants_grad(x, weight, bias):
        raise ValueError("small_linear has no backward: call it under torch.no_grad()/inference_mode(), or use "
                         "torch.nn.functional.linear for training")
    return torch.ops.hass.small_linear(x, weight, bias)
