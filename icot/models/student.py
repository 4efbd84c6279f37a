"""The mind-reading student: a decoder that reads `input <sep>` and answers, while before every block
l its hidden state at the separator is replaced by MLP_l(state_l).

During mind-reading the states are the teacher's normalised states; during coupling and inference
they are the emulator's predictions, which go through these same MLPs.
"""

from __future__ import annotations

import torch
from torch import nn

from icot.models.decoder import decoder_shape, edit_block_inputs, replace_rows


def state_mlp(in_features: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, hidden))


class Student(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.num_layers, self.hidden_size = decoder_shape(decoder)
        self.state_mlps = nn.ModuleList(state_mlp(self.hidden_size, self.hidden_size)
                                        for _ in range(self.num_layers))

    def injected_states(self, states: torch.Tensor) -> torch.Tensor:
        """[B, L, H] states -> [B, L, H] vectors written into the stream."""
        return torch.stack([mlp(states[:, layer]) for layer, mlp in enumerate(self.state_mlps)], dim=1)

    def injection(self, states: torch.Tensor, positions: torch.Tensor, prompt_pass_only: bool = False):
        """A context in which every block input gets its separator row replaced.

        With `prompt_pass_only`, only the first forward is edited: during cached generation the
        injected rows then live on in the KV cache and later single-token steps are left alone.
        """
        vectors = self.injected_states(states)

        def replace(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            return replace_rows(hidden, positions, vectors[:, layer])

        return edit_block_inputs(self.decoder, replace, once=prompt_pass_only)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_sep: torch.Tensor,
                states: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        """The decoder's output (loss on `labels`, the answer tokens) with states injected."""
        with self.injection(states, first_sep):
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                use_cache=False, **kwargs)
