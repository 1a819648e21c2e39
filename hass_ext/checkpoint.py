"""Deprecated: draft loading and saving moved to ``hass_ext.draft_io`` (the public functions stay available as
``hass_ext.load_draft``, ``hass_ext.save_draft`` and ``hass_ext.CheckpointError``)."""
import warnings

from .draft_io import (BIN_NAME, CONFIG_NAME, PROFILE_NAME, SAFETENSORS_NAME, TOKEN_MAP_NAME,  # noqa: F401
                       CheckpointError, check_draft_matches_target, load_draft, load_token_map, save_draft,
                       save_token_map)

warnings.warn("hass_ext.checkpoint is deprecated: import from hass_ext.draft_io (or hass_ext.load_draft / "
              "save_draft)", DeprecationWarning, stacklevel=2)
