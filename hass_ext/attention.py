"""Deprecated: the transformers integration is ``hass_ext.hf_attention`` (``hass_ext.register_hass_tree``)."""
import warnings

from .hf_attention import ATTN_IMPLEMENTATION, hass_tree_attention_forward, register_hass_tree  # noqa: F401

NAME = ATTN_IMPLEMENTATION

warnings.warn("hass_ext.attention is deprecated: use hass_ext.register_hass_tree or hass_ext.hf_attention",
              DeprecationWarning, stacklevel=2)
