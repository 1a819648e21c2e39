"""Python entry points of the hass kernels (torch.ops.hass.*): input validation and fake implementations.

Each wrapper checks its inputs and raises ValueError naming the argument, its shape/dtype and what was
expected; the kernels themselves live in csrc/ (CPU) and csrc/cuda (CUDA). Oracles: hass_ext/reference.py.
"""
from typing import Sequence, Union

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
