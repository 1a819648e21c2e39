"""The target's KV cache during a generate() call: every layer's keys and values in one tensor allocated once.

``SlotCache`` is a transformers ``Cache`` whose layers are views into one buffer ``[2 * layers, B, Hkv, capacity,
d]`` (layer i's keys at 2i, its values at 2i + 1). A forward writes its new entries into the slots after the
layer's length and attends to the view ``[0, length)``: nothing grows, nothing is concatenated, and the storage
never changes while the cache lives. Dropping entries only moves the length back (the slots are overwritten by
the next forward), and the accepted entries of a verified tree move into place for all layers at once with one
``hass_ext.ops.compact_kv`` over the buffer.

The layers report the sizes a transformers ``DynamicCache`` would (length so far, no maximum), so the model builds
the same masks and computes the same values as with one; any model that takes a DynamicCache takes this cache.
"""
import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import ops


class SlotLayer(DynamicLayer):
    """One layer of a SlotCache: its keys and values are ``[B, Hkv, length, d]`` views into the shared buffer."""

    def __init__(self, cache: "SlotCache", index: int):
        super().__init__()
        self._cache, self._index = cache, index
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        buf = self._cache.buffer_for(key_states)
        self.dtype, self.device = buf.dtype, buf.device
        self.is_initialized = True
        self._set_length(0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        buf, i = self._cache.buffer, 2 * self._index
        start, end = self.length, self.length + key_states.shape[-2]
        if end > buf.shape[3]:
            raise RuntimeError(f"the KV cache holds {buf.shape[3]} positions; this forward needs {end} (allocate it "
                               f"for prompt + max_new_tokens + tree size)")
        buf[i, :, :, start:end].copy_(key_states)
        buf[i + 1, :, :, start:end].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` entries (a negative count, as DynamicLayer.crop takes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of entries to drop, got {tokens_to_remove}")
        if self.is_initialized:
            self._set_length(max(0, self.length + tokens_to_remove))

    def reset(self) -> None:
        if self.is_initialized:
            self._set_length(0)

    def _set_length(self, length: int) -> None:
        buf, i = self._cache.buffer, 2 * self._index
        self.length = length
        self.keys, self.values = buf[i, :, :, :length], buf[i + 1, :, :, :length]


class SlotCache(Cache):
    """A target KV cache of ``capacity`` positions per layer in one buffer (module docstring).

    The buffer is allocated at the first forward, with the batch, KV heads, head dim, dtype and device of its keys.
    """

    def __init__(self, num_layers: int, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        super().__init__(layers=[SlotLayer(self, i) for i in range(num_layers)])
        self.capacity = capacity
        self.buffer = None  # [2 * layers, B, Hkv, capacity, d]

    @classmethod
    def for_model(cls, config, capacity: int) -> "SlotCache":
        """A cache for a transformers model with this config (its text config for multimodal ones)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(text.num_hidden_layers, capacity)

    def buffer_for(self, key_states: torch.Tensor) -> torch.Tensor:
        """The buffer, allocated on the first call after the keys' shape; a later layer's keys must match it."""
        B, H, _, d = key_states.shape
        shape = (2 * len(self.layers), B, H, self.capacity, d)
        if self.buffer is None:
            # a normal tensor even when the first forward runs under inference_mode: later no_grad forwards write it
            with torch.inference_mode(False):
                self.buffer = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
        elif self.buffer.shape != shape or self.buffer.dtype != key_states.dtype \
                or self.buffer.device != key_states.device:
            raise ValueError(f"SlotCache holds one buffer for all layers: keys of shape {tuple(key_states.shape)}, "
                             f"{key_states.dtype} on {key_states.device} do not fit its {tuple(self.buffer.shape)}, "
                             f"{self.buffer.dtype} on {self.buffer.device} (layers of different KV shapes)")
        return self.buffer

    @property
    def length(self) -> int:
        """Entries held (every layer holds the same number between forwards)."""
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` entries of every layer."""
        for layer in self.layers:
            if layer.is_initialized:
                layer._set_length(length)

    def adopt(self, buffer: torch.Tensor, length: int) -> None:
        """Use ``buffer`` ``[2 * layers, B, Hkv, capacity, d]`` (filled elsewhere, e.g. by per-row prefills) as this
        cache's storage, every layer holding ``length`` entries."""
        if buffer.dim() != 5 or buffer.shape[0] != 2 * len(self.layers) or buffer.shape[3] != self.capacity:
            raise ValueError(f"SlotCache.adopt needs a [{2 * len(self.layers)}, B, Hkv, {self.capacity}, d] buffer, "
                             f"got {tuple(buffer.shape)}")
        if not 0 <= length <= self.capacity:
            raise ValueError(f"SlotCache.adopt: length must lie in [0, {self.capacity}], got {length}")
        self.buffer = buffer
        for layer in self.layers:
            layer.dtype, layer.device, layer.is_initialized = buffer.dtype, buffer.device, True
            layer._set_length(length)

    def select_rows(self, rows) -> None:
        """Keep batch rows ``rows`` (ascending indices), moved to the front of the same storage in place: the
        cache then has ``len(rows)`` rows (a batch whose finished rows leave it)."""
        rows = list(rows)
        if any(b <= a for a, b in zip(rows, rows[1:])) or (rows and not 0 <= rows[0] <= rows[-1] < self.buffer.shape[1]):
            raise ValueError(f"select_rows takes ascending row indices in [0, {self.buffer.shape[1]}), got {rows}")
        for dst, src in enumerate(rows):  # ascending, so dst <= src: a row moves before anything overwrites it
            if dst != src:
                self.buffer[:, dst].copy_(self.buffer[:, src])
        self.adopt(self.buffer.narrow(1, 0, len(rows)), self.length)

    def keep(self, slots: torch.Tensor, start) -> None:
        """Move the entries at ``slots`` (int64 ``[m]`` on the buffer's device, in order) to ``start ..
        start + m - 1`` in every layer at once (one compact_kv over the buffer) and keep ``start + m`` entries.

        A batch with rows of different lengths passes ``slots [B, m]`` (-1 after a row's valid entries) and
        ``start`` as an int64 ``[B]`` tensor; the common length is then the caller's to set (``truncate``)."""
        ops.compact_kv(self.buffer, slots, start)
        if isinstance(start, int):
            self.truncate(start + slots.shape[-1])
