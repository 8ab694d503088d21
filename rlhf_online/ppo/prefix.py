"""The token prefix that every row of a batch starts with, split off so a pass computes it once instead of per row.

A chat template puts the same system prompt before every user prompt (SmolLM2's is 24 tokens with the
user turn's opening, a third of a PPO row of ~40 prompt and 32 reply tokens), and a pass over a batch repeats that
work on every row. `split` finds the longest run of tokens all rows start with, up to a column
the caller needs no hidden states before, and returns it with the rows' remainders; the pass then
runs the prefix as one row, repeats its keys and values for every row and runs the remainders
after it (PolicyWithValue._last_hidden). Attention sees the same keys at the same positions, so
the hidden states are those of the whole rows, to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedPrefix:
    """A batch split into one prefix every row starts with and the rows' remainders after it."""

    ids: torch.Tensor  # [P] the prefix's tokens, at positions 0..P-1 of every row
    rest_ids: torch.Tensor  # [B, W] each row without its prefix, left-padded, all-padding columns dropped
    rest_mask: torch.Tensor  # [B, W]
    rest_positions: torch.Tensor  # [B, W] each remainder token's position in its whole row


def split(ids: torch.Tensor, mask: torch.Tensor, before: int, min_length: int) -> SharedPrefix | None:
    """The prefix of at least `min_length` tokens that all rows of `ids` [B, L] start with, or None.

    Rows are left-padded (`mask` [B, L] is 0 before a row's first token, then 1 up to column
    `before` at least). The prefix ends before column `before` in every row, so each row's hidden
    states from that column on come from its remainder; columns before it are not returned by a
    pass over the split (the caller asks only for later ones).
    """
    rows, width = ids.shape
    if rows < 2 or min_length < 1:
        return None
    first = (mask == 0).long().cumprod(1).sum(1)  # [B] leading padding columns of each row
    room = int((before - first).min())  # the longest prefix that ends before `before` in every row
    if room < min_length:
        return None
    window = first.unsqueeze(1) + torch.arange(room, device=ids.device)  # [B, room] each row's first `room` columns
    tokens, real = ids.gather(1, window), mask.gather(1, window).bool()
    same = (tokens == tokens[:1]).all(0) & real.all(0)  # [room] columns where every row holds the same real token
    length = int(same.long().cumprod(0).sum())
    if length < min_length:
        return None
    # A remainder keeps its row's left padding less the padding all rows share: column c of it reads the row's
    # column c + trim before the row's first token and c + trim + length from there on.
    trim = int(first.min())
    cols = torch.arange(width - length - trim, device=ids.device).unsqueeze(0) + trim  # [1, W]
    source = cols + length * (cols >= first.unsqueeze(1))  # [B, W]
    rest_mask = mask.gather(1, source)
    positions = (length + rest_mask.cumsum(1) - 1).clamp(min=length)
    return SharedPrefix(tokens[0, :length], ids.gather(1, source), rest_mask, positions)
