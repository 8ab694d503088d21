"""The running batch's KV cache: left-padded rows that can be merged, selected and trimmed."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Positions a layer's buffer keeps free beyond its length when it (re)allocates: decode steps append into them,
# so the buffer is copied once every GROW_BY steps instead of at every step.
GROW_BY = 64


class _Buffer:
    """A [B, KV, capacity, D] tensor whose first `length` positions hold a layer's keys (or values)."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype  # None: the dtype of the first tensor written
        self.data: torch.Tensor | None = None
        self.length = 0

    def view(self) -> torch.Tensor | None:
        """[B, KV, length, D], a view of the buffer."""
        return None if self.data is None else self.data[:, :, : self.length]

    def replace(self, tensor: torch.Tensor | None, room: int = 0) -> None:
        """Hold a copy of `tensor` [B, KV, T, D] in a new buffer with `room` + GROW_BY free positions."""
        if tensor is None:
            self.data, self.length = None, 0
            return
        b, h, t, d = tensor.shape
        self.data = tensor.new_empty((b, h, t + room + GROW_BY, d), dtype=self.dtype or tensor.dtype)
        self.data[:, :, :t] = tensor
        self.length = t

    def append(self, states: torch.Tensor) -> None:
        """Write [B, KV, n, D] after the held positions, moving to a larger buffer when they do not fit."""
        n = states.shape[2]
        if self.data is None or self.length + n > self.data.shape[2]:
            self.replace(self.view() if self.data is not None else states[:, :, :0], room=n)
        self.data[:, :, self.length: self.length + n] = states
        self.length += n


def _buffered(name: str, what: str) -> property:
    """A property reading the _Buffer `name` as a view and copying an assigned tensor into it."""
    return property(lambda self: getattr(self, name).view(), lambda self, tensor: getattr(self, name).replace(tensor),
                    doc=f"[B, KV, T, D] view of the {what} buffer; assigning copies into a new one.")


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values [B, KV, T, D] are views of buffers with room for more positions.

    transformers' DynamicLayer appends a decode step's token with torch.cat: a copy of the whole
    layer at every step (5.6% of the engine's time at 32 rows x 128 tokens, AMX Xeon, py-spy).
    Here a step writes one position into the buffer. `dtype` is the buffers' dtype: fp32 for a
    bf16 model decoding with engine.attention's fp32 attention, which read the bf16 cache as fp32
    copies at every step (inside its 18%); the values are the same bf16 numbers, widened once when
    written, so the attention computes exactly what it did. Assigning `keys` or `values` (as
    KVBatch's merge and select do) copies the tensor into a new buffer.
    """

    keys = _buffered("_k", "key")  # type: ignore[assignment]
    values = _buffered("_v", "value")  # type: ignore[assignment]

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self._k, self._v = _Buffer(dtype), _Buffer(dtype)
        super().__init__()  # sets keys and values to None through the properties

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        """Take the device and the buffers' dtype from the first keys; the buffers come with them."""
        self.dtype = self._k.dtype or key_states.dtype
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, KV, n, D] keys and values; (all keys, all values) as views of the buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        self._k.append(key_states)
        self._v.append(value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Positions held."""
        return self._k.length


def growing(cache: DynamicCache, dtype: torch.dtype | None = None) -> DynamicCache:
    """The cache with each plain DynamicLayer's keys and values moved into a GrowingLayer (buffers in `dtype`).

    Only plain layers: a sliding-window layer keeps its window (and its own class). A cache built
    without a config makes its layers as they are first written: those are GrowingLayers too.
    """
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            continue
        grown = GrowingLayer(dtype)
        if layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            grown.lazy_initialization(layer.keys)
            grown.keys, grown.values = layer.keys, layer.values
        cache.layers[i] = grown
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = lambda: GrowingLayer(dtype)
    return cache


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a [B, H, T, D] cache tensor with zeros on the left of T up to `length`."""
    missing = length - t.shape[2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)


class KVBatch:
    """Cache, attention mask, positions and pending input token of every running row.

    Rows are left-padded to a common length T, so a decode step is a single forward over
    [B, 1] new tokens. `mask` [B, T] marks real cache entries; `positions` [B] is the position
    id of each row's pending token `next_tokens` [B], which is not in the cache yet.
    """

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, next_tokens: torch.Tensor,
                 cache_dtype: torch.dtype | None = None) -> None:
        self.cache = growing(cache, cache_dtype)  # decode steps append in place (GrowingLayer)
        self.mask = mask
        self.positions = positions
        self.next_tokens = next_tokens

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        """Padded cache length T."""
        return int(self.mask.shape[1])

    def merge(self, other: KVBatch) -> None:
        """Append other's rows below ours, left-padding whichever cache is shorter."""
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)], dim=0)
        pad = lambda m: torch.cat([m.new_zeros(m.shape[0], length - m.shape[1]), m], dim=1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(other.mask)], dim=0)
        self.positions = torch.cat([self.positions, other.positions])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])

    def select(self, keep: list[int]) -> None:
        """Keep only the given rows (in that order), then drop columns that are padding in all of them."""
        idx = torch.tensor(keep, dtype=torch.long)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
        self.mask = self.mask.index_select(0, idx)
        self.positions = self.positions.index_select(0, idx)
        self.next_tokens = self.next_tokens.index_select(0, idx)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.length
        if start > 0:
            for layer in self.cache.layers:  # the layers copy what they are given into new buffers
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def step_inputs(self) -> dict:
        """Forward kwargs for one decode step; extends the mask by the pending token."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        return {
            "input_ids": self.next_tokens.unsqueeze(1),
            "attention_mask": self.mask,
            "position_ids": self.positions.unsqueeze(1),
            "past_key_values": self.cache,
            "use_cache": True,
        }
