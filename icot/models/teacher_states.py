"""Teacher states: the teacher's block inputs along a diagonal across the CoT positions.

For layer l (0..L-1) the position is t_l between the first separator s1 and the second s2:
- dynamic delta (default): t_l = round(s1 + l (s2 - s1) / (L - 1)), per example;
- fixed delta k: t_l = min(s1 + l k, s2); k = 0 reads s1 at every layer.
Each state is LayerNorm(h_l[t_l]) without affine parameters, where h_l is the input of block l
(h_0 is the embedding output; the final norm's output is never used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from icot.errors import UserError
from icot.models.decoder import decoder_blocks, edit_block_inputs, gather_rows

Delta = str | int  # "dynamic" or a fixed integer step (0 reads the first separator at every layer)


def diagonal_positions(first_sep: torch.Tensor, second_sep: torch.Tensor, num_layers: int,
                       delta: Delta = "dynamic") -> torch.Tensor:
    """[B, L] positions t_l for every example (computed per example, never from the first one)."""
    layers = torch.arange(num_layers, device=first_sep.device, dtype=torch.float64)
    s1 = first_sep.to(torch.float64).unsqueeze(1)
    s2 = second_sep.to(torch.float64).unsqueeze(1)
    if delta == "dynamic":
        step = (s2 - s1) / max(num_layers - 1, 1)
        return torch.round(s1 + layers * step).long()
    return torch.minimum(s1 + layers * float(delta), s2).long()


def normalize_state(state: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, computed in fp32 for stability under bf16."""
    return F.layer_norm(state.float(), state.shape[-1:]).to(state.dtype)


@torch.no_grad()
def teacher_states(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   first_sep: torch.Tensor, second_sep: torch.Tensor, delta: Delta = "dynamic",
                   return_positions: bool = False):
    """[B, L, H] normalised teacher states on the with-CoT view (and the [B, L] positions if asked).

    Block inputs are read by hooks, so only B x L rows are kept, not every layer's full hidden states,
    and the LM head (a vocabulary-sized matmul) is skipped by running the base model only.
    """
    num_layers = len(decoder_blocks(teacher))
    positions = diagonal_positions(first_sep, second_sep, num_layers, delta)
    if (positions >= input_ids.size(1)).any():
        raise UserError("teacher states: a diagonal position lies beyond the sequence; "
                        "is the second separator missing from the with-CoT view?")
    states: list[torch.Tensor | None] = [None] * num_layers

    def read(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        states[layer] = normalize_state(gather_rows(hidden, positions[:, layer]))
        return hidden

    with edit_block_inputs(teacher, read):
        teacher.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    stacked = torch.stack(states, dim=1)
    return (stacked, positions) if return_positions else stacked
