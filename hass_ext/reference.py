"""Deprecated: the kernels' test oracles are ``hass_ext.oracles`` (``<op>_oracle``); the old names work here."""
import warnings

from .oracles import (align_attention_oracle, align_masks, compact_kv_oracle, distill_loss_oracle,  # noqa: F401
                      distill_topk_indices, fused_linear_distill_loss_oracle, hass_compute_loss_reference,
                      tree_attention_mask, tree_attention_oracle, verify_tree_oracle)

compact_kv_reference = compact_kv_oracle
verify_tree_reference = verify_tree_oracle
reference_tree_attention = tree_attention_oracle
reference_align_attention = align_attention_oracle
distill_loss_reference = distill_loss_oracle
fused_linear_distill_loss_reference = fused_linear_distill_loss_oracle

warnings.warn("hass_ext.reference is deprecated: use hass_ext.oracles (compact_kv_oracle, verify_tree_oracle, ...)",
              DeprecationWarning, stacklevel=2)
