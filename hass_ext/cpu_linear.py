"""Deprecated: the small-M linear layers are ``hass_ext.ops.small_linear`` (``hass_ext.use_small_linear``)."""
import warnings

from .ops.small_linear import (MAX_ROWS, SmallLinear, as_exact_bf16, linear, tensor_version,  # noqa: F401
                               use_blas_linear, use_small_batch_linear)

SmallBatchLinear = SmallLinear

warnings.warn("hass_ext.cpu_linear is deprecated: use hass_ext.ops.small_linear (SmallLinear, use_small_linear)",
              DeprecationWarning, stacklevel=2)
