"""Python entry points of the hass kernels (``torch.ops.hass.*``), one module per op.

Each module holds one op's wrapper (argument checks raising ValueError that name the argument, its
shape/dtype/device and what was expected), its fake (meta) kernel and, where it has one, its autograd rule; the
kernels themselves live in csrc/ (CPU) and csrc/cuda/ (CUDA), their plain-PyTorch oracles in hass_ext.oracles.

- ``compact_kv``: move the accepted tree entries of the KV caches into contiguous slots.
- ``verify_tree``: which drafted tokens the target accepts (lossless speculative sampling).
- ``tree_attention``: attention of the tree nodes over the prefix and their ancestors (``MAX_TREE_NODES``).
- ``align_attention``: HASS harmonized context alignment attention (``ALIGN_ATTENTION_MODES``).
- ``distill_loss``: HASS distillation losses from logits.
- ``fused_linear_distill``: the same losses from hidden states through a frozen head (``fused_linear_distill_loss``,
  ``distill_target_stats``, ``DistillTargetStats``).
- ``small_linear``: decode-sized row-invariant linear layers (``small_linear``, ``small_linear_tc`` on tensor
  cores, ``linear``, ``SmallLinear``, ``use_small_linear``, ``use_blas_linear``).
- ``_checks``: the argument checks they share (``wants_grad``).

As attributes of ``hass_ext.ops`` the op functions hide their modules (``ops.tree_attention`` is the function);
import a module's other names from it: ``from hass_ext.ops.tree_attention import MAX_TREE_NODES``.
"""
from ._checks import wants_grad
from .align_attention import ALIGN_ATTENTION_MODES, align_attention
from .compact_kv import compact_kv
from .distill_loss import distill_loss
from .fused_linear_distill import (DEFAULT_VOCAB_CHUNK, DistillTargetStats, distill_target_stats,
                                   fused_linear_distill_loss)
from .small_linear import SmallLinear, linear, small_linear, small_linear_tc, use_blas_linear, use_small_linear
from .tree_attention import MAX_TREE_NODES, tree_attention
from .verify_tree import verify_tree

__all__ = [
    "compact_kv", "verify_tree", "tree_attention", "MAX_TREE_NODES", "align_attention", "ALIGN_ATTENTION_MODES",
    "distill_loss", "fused_linear_distill_loss", "distill_target_stats", "DistillTargetStats",
    "DEFAULT_VOCAB_CHUNK", "small_linear", "small_linear_tc", "linear", "SmallLinear", "use_small_linear",
    "use_blas_linear",
    "wants_grad",
]
