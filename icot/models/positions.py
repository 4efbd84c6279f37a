"""Shifted positions for stepwise internalization's `keep_position` (the reference's --keep_position,
da03/Internalize_CoT_Step_by_Step src/train.py:287-320): after r CoT tokens are removed from the left,
the tokens left keep the positions they had, and the first separator takes the last removed token's.
In ids: every position p at or after the first separator reads as p + r.

A forward pre-hook on the learned position embedding applies the shift to whatever positions the caller
or `generate` computed (left padding included), so training, validation decoding and `icot eval` share
one mechanism. Like the reference, this needs learned absolute positions (GPT-2's `wpe`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from icot.errors import UserError


def position_embedding(decoder: nn.Module) -> nn.Embedding:
    embedding = getattr(getattr(decoder, "base_model", decoder), "wpe", None)
    if not isinstance(embedding, nn.Embedding):
        raise UserError(f"stepwise.keep_position needs learned absolute position embeddings (GPT-2's wpe), "
                        f"which {type(decoder).__name__} does not have (the reference supports GPT-2 only)")
    return embedding


def shift_from(positions: torch.Tensor, start: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`positions` [B, T] with `shift[b]` added where a position is at or after `start[b]`."""
    start, shift = start.to(positions.device).view(-1, 1), shift.to(positions.device).view(-1, 1)
    return torch.where(positions >= start, positions + shift, positions)


@contextmanager
def shifted_positions(decoder: nn.Module, start: torch.Tensor, shift: torch.Tensor) -> Iterator[None]:
    """While active, the decoder reads position p >= start[b] of row b as p + shift[b] (`start`: the
    first separator's position, unpadded)."""
    embedding = position_embedding(decoder)

    def hook(module, args):
        positions = args[0]
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(start.numel(), -1)
        return (shift_from(positions, start, shift),)

    handle = embedding.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
