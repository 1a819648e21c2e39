"""tree_attention: attention of the tree nodes over the committed prefix and their own ancestors."""
from typing import Optional

import torch

from .. import _library  # noqa: F401  (registers torch.ops.hass.*)
from ._checks import INDEX_DTYPES, check_attention_qkv, check_tensor, describe, softmax_scale

MAX_TREE_NODES = 1024  # the kernels' limit (kMaxTreeNodes in csrc/include/hass/attention.h; a test compares them)


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
        (checked here before the launch and by the op itself: on CUDA by one host read, skipped under CUDA graph
        capture, where the kernel clamps them into range).
    Returns ``[B, Hq, n, d]`` in q's dtype: row i attends every visible prefix key and the tree keys j with
    ``tree_mask[b, i, j]``, with one softmax over both. A batch of trees of different sizes is padded to a common
    n: padding nodes (mask rows and columns false for real nodes) are never seen by real nodes, and their own
    outputs are whatever their mask rows say (a row with no visible key at all gives zeros).
    """
    check_attention_qkv("tree_attention", q, k, v)
    B, Hq, n, d = q.shape
    L = k.shape[2]
    check_tensor("tree_mask", tree_mask, dims=(2, 3), dtypes=(torch.bool,), device=q.device)
    if tree_mask.dim() == 2:
        tree_mask = tree_mask.unsqueeze(0).expand(B, n, n)
    if tuple(tree_mask.shape) != (B, n, n):
        raise ValueError(f"tree_mask must be [B, n, n] = [{B}, {n}, {n}] for q {tuple(q.shape)}, "
                         f"got {describe(tree_mask)}")
    if n > L:
        raise ValueError(f"k/v must hold the prefix and the n = {n} tree nodes, but L = {L} < n ({describe(k)})")
    if n > MAX_TREE_NODES:
        raise ValueError(f"tree_attention supports trees of at most {MAX_TREE_NODES} nodes, got n = {n} "
                         f"(q {describe(q)})")
    if prefix_lens is not None:
        check_tensor("prefix_lens", prefix_lens, dims=(1,), dtypes=INDEX_DTYPES, device=q.device)
        if prefix_lens.shape[0] != B:
            raise ValueError(f"prefix_lens must have {B} entries (one per batch row), got {describe(prefix_lens)}")
        if prefix_lens.device.type == "cpu" and prefix_lens.numel() and (
                int(prefix_lens.min()) < 0 or int(prefix_lens.max()) > L - n):
            raise ValueError(f"prefix_lens values must lie in [0, L - n] = [0, {L - n}], got "
                             f"{prefix_lens.tolist()}")
    return torch.ops.hass.tree_attention(q, k, v, tree_mask, prefix_lens, softmax_scale(scale, d))
