"""Python entry points of the hass kernels (torch.ops.hass.*): input validation and fake implementations.

Each wrapper checks its inputs and raises ValueError naming the argument, its shape/dtype and what was
expected; the kernels themselves live in csrc/ (CPU) and csrc/cuda (CUDA). Oracles: hass_ext/reference.py.
"""
import math
from typing import Optional, Sequence, Union

import torch

from . import _library  # noqa: F401  (registers the ops)

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
    if src_slots.dim() == 1:
        src_slots = src_slots.unsqueeze(0)
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
