"""The running batch's KV cache: left-padded rows that can be merged, selected and trimmed."""

from __future__ import annotations

import torch
from transformers import DynamicCache


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

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, next_tokens: torch.Tensor) -> None:
        self.cache = cache
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
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:].contiguous()
                layer.values = layer.values[:, :, start:].contiguous()
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
