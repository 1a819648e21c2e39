"""The "hass_tree" attention implementation for Hugging Face transformers models.

After ``register_hass_tree()``, any transformers model loaded with ``attn_implementation="hass_tree"`` verifies a
token tree with hass_ext's tree-attention kernel: pass the tree's ancestor mask to the forward,

    model(input_ids=tree_tokens, position_ids=prefix_len + depth, past_key_values=cache, tree_mask=mask)

and every attention layer attends the new queries (the tree nodes) over the whole cache with
``hass_ext.ops.tree_attention``. Without ``tree_mask`` the layers call transformers' own sdpa implementation unchanged
(prefill and plain decoding give exactly the sdpa results), and the attention masks transformers builds are the
sdpa ones.

Tree path conventions: the n tree tokens are the last n entries of the cache after the update (the model
appends them), ``tree_mask`` is bool ``[B, n, n]`` or ``[n, n]``; transformers' ``attention_mask`` is ignored there,
so a left-padded batch is not supported in the tree path. Batches whose prefixes differ in length can pass
``tree_prefix_lens`` (int64 ``[B]``) when each row's prefix is right-padded to a common length.
"""
import torch

from .ops import tree_attention
from .ops._checks import softmax_scale

ATTN_IMPLEMENTATION = "hass_tree"  # the name to pass as attn_implementation (import it, do not copy it)


def hass_tree_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask, dropout: float = 0.0, scaling=None,
                                tree_mask=None, tree_prefix_lens=None, **kwargs):
    """transformers attention function: tree attention when ``tree_mask`` is given, else sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # start-up: transformers is heavy

    if tree_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION}: dropout is not supported in the tree-verification path")
    if tree_mask.device != query.device:
        tree_mask = tree_mask.to(query.device)
    if _is_batch_mask(tree_mask, query) and _is_prefix_lens(tree_prefix_lens, query):
        # q/k/v come from the model's own projections and cache: only the mask and the prefix lengths' form needed
        # checking (the op checks their values itself, with no host read under CUDA graph capture), and the op is
        # called once per layer of every verification, where the full argument checks of tree_attention
        # cost a noticeable share of the kernel's time
        scale = softmax_scale(scaling, query.shape[-1])
        out = torch.ops.hass.tree_attention(query, key, value, tree_mask, tree_prefix_lens, scale)
    else:  # the public op checks and explains whatever is wrong (and the prefix lengths' values)
        out = tree_attention(query, key, value, tree_mask, scale=scaling, prefix_lens=tree_prefix_lens)
    return out.transpose(1, 2), None  # transformers expects [B, n, H, d]


def _is_batch_mask(tree_mask: torch.Tensor, query: torch.Tensor) -> bool:
    """Whether tree_mask is the bool [B, n, n] the kernel takes for queries [B, H, n, d]."""
    B, n = query.shape[0], query.shape[2]
    return tree_mask.dtype == torch.bool and tree_mask.shape == (B, n, n)


def _is_prefix_lens(prefix_lens, query: torch.Tensor) -> bool:
    """Whether prefix_lens is None or the int64 [B] on the queries' device the kernel takes."""
    return prefix_lens is None or (isinstance(prefix_lens, torch.Tensor) and prefix_lens.dtype == torch.int64
                                   and prefix_lens.shape == (query.shape[0],) and prefix_lens.device == query.device)


def register_hass_tree() -> str:
    """Register ``ATTN_IMPLEMENTATION`` (``"hass_tree"``) with transformers' attention and attention-mask
    interfaces; idempotent.

    Returns the implementation name to pass as ``attn_implementation``.
    """
    from transformers import AttentionInterface  # start-up: transformers loads only when it is used
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # start-up: as above

    AttentionInterface.register(ATTN_IMPLEMENTATION, hass_tree_attention_forward)
    # Outside the tree path the layers behave as sdpa, so they need the masks transformers builds for sdpa.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
