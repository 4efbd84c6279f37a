"""The thought emulator: predicts the teacher's states from the input alone, layer by layer.

Before every block l, at the separator position s1:
  h_l          current state at s1
  m_l          mixture vector: the single component (M = 1), the component of the CoT token at t_l
               while training the token mixture, or softmax(h_l E^T / temperature) E at coupling
               and inference
  zhat_l     = MLP_l([h_l; m_l])                       the prediction of the teacher state z_l
  o_l, state = LSTM(zhat_l + context, state)           context is 0 at layer 0; one LSTM cell step per
                                                       layer (nn.LSTMCell: nn.LSTM on a CPU hands every
                                                       one-step call to oneDNN, whose setup dominates)
  context    = softmax over earlier layers of (query(o_l) . key_j) applied to key_j (keys are the
               values, no scaling); key_l = key(o_l) joins the keys afterwards
  written    = out_proj([o_l; context]) replaces the stream's state at s1
Loss: sum over layers and dimensions of (z_l - zhat_l)^2 / 2, mean over the batch (+ the mixture
cross-entropy for the token mixture).
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from icot.models.decoder import StopForward, decoder_shape, edit_block_inputs, gather_rows, replace_rows
from icot.models.student import state_mlp


@dataclass
class EmulatorOutput:
    states: torch.Tensor                      # [B, L, H] predicted teacher states zhat
    mixture_logits: torch.Tensor | None       # [B, L, M] for the token mixture, else None


def emulation_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over layers and dimensions of squared error / 2, mean over the batch."""
    return (predicted.float() - target.float()).pow(2).sum(dim=(1, 2)).mean() / 2


class _LayerRecurrence:
    """State carried across the layers of one emulator forward (LSTM state, keys, context)."""

    def __init__(self, emulator: "Emulator", positions: torch.Tensor, mixture_targets: torch.Tensor | None):
        self.emulator = emulator
        self.positions = positions
        self.mixture_targets = mixture_targets
        self.lstm_state = None
        self.keys: torch.Tensor | None = None   # [B, layers so far, H]
        self.context: torch.Tensor | None = None
        self.predictions: list[torch.Tensor] = []
        self.mixture_logits: list[torch.Tensor] = []

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        emulator = self.emulator
        current = gather_rows(hidden, self.positions)
        if emulator.mixture_folded:
            features = current
        else:
            mixture = emulator.mixture_vector(current, layer, self.mixture_targets, self.mixture_logits)
            features = torch.cat((current, mixture), dim=-1)
        prediction = emulator.state_mlps[layer](features)
        self.predictions.append(prediction)
        if emulator.inference_only and layer == emulator.num_layers - 1:
            raise StopForward   # nothing reads the last block's output, nor what would be written into it

        if self.context is None:
            self.context = torch.zeros_like(prediction)
        self.lstm_state = emulator.lstm(prediction + self.context, self.lstm_state)
        output = self.lstm_state[0]
        key = emulator.key_proj(output)
        if self.keys is None:
            self.keys = key.unsqueeze(1)
        else:
            query = emulator.query_proj(output)
            weights = torch.bmm(self.keys, query.unsqueeze(-1)).softmax(dim=1)   # [B, l, 1]
            self.context = (weights * self.keys).sum(dim=1)
            self.keys = torch.cat((self.keys, key.unsqueeze(1)), dim=1)
        written = emulator.out_proj(torch.cat((output, self.context), dim=-1))
        return replace_rows(hidden, self.positions, written)


class Emulator(nn.Module):
    def __init__(self, decoder: nn.Module, mixture_size: int = 1, temperature: float = 0.05):
        super().__init__()
        self.decoder = decoder
        self.num_layers, self.hidden_size = decoder_shape(decoder)
        hidden = self.hidden_size
        self.mixture_size = mixture_size
        self.temperature = temperature
        self.state_mlps = nn.ModuleList(state_mlp(2 * hidden, hidden) for _ in range(self.num_layers))
        self.mixture = nn.Embedding(mixture_size, hidden)
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.key_proj = nn.Linear(hidden, hidden)
        self.query_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(2 * hidden, hidden)
        self.mixture_folded = False
        self.inference_only = False

    @torch.no_grad()
    def for_inference(self) -> "Emulator":
        """The same predictions for less work, what decoding one example at a time is bound by:
        - the forward stops once the last layer's state is predicted (the last block runs for nothing);
        - with a single component (M = 1) every state MLP's first layer sees a constant mixture half,
          W [h; m] + b = W_h h + (W_m m + b), folded here into the bias: a third less MLP weight to read.
        Training and saving are refused from then on."""
        self.inference_only = True
        if self.mixture_size != 1 or self.mixture_folded:
            return self
        hidden, constant = self.hidden_size, self.mixture.weight[0]
        for mlp in self.state_mlps:
            first = mlp[0]
            folded = nn.Linear(hidden, first.out_features, device=first.weight.device, dtype=first.weight.dtype)
            folded.weight.copy_(first.weight[:, :hidden])
            folded.bias.copy_(first.bias + first.weight[:, hidden:] @ constant)
            mlp[0] = folded
        self.mixture_folded = True
        return self

    def mixture_vector(self, current: torch.Tensor, layer: int, targets: torch.Tensor | None,
                       logits_out: list[torch.Tensor]) -> torch.Tensor:
        weight = self.mixture.weight
        if self.mixture_size == 1:
            return weight.expand(current.size(0), -1)
        logits = current @ weight.T                    # [B, M]
        logits_out.append(logits)
        if targets is not None:                        # training: the CoT token's component
            return self.mixture(targets[:, layer])
        return (logits / self.temperature).softmax(dim=-1) @ weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_sep: torch.Tensor,
                mixture_targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> EmulatorOutput:
        """Predicted states for every layer. `mixture_targets` [B, L] (token ids at the diagonal
        positions) selects the training-time component for the token mixture; `position_ids` are
        needed for left-padded prompts."""
        if self.inference_only and torch.is_grad_enabled():
            raise RuntimeError("this emulator was prepared for inference (for_inference); it cannot be trained")
        recurrence = _LayerRecurrence(self, first_sep, mixture_targets)
        with suppress(StopForward), edit_block_inputs(self.decoder, recurrence):
            # Only block inputs are used: the base model suffices, no LM head.
            self.decoder.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
        logits = torch.stack(recurrence.mixture_logits, dim=1) if recurrence.mixture_logits else None
        return EmulatorOutput(states=torch.stack(recurrence.predictions, dim=1), mixture_logits=logits)

    def loss(self, output: EmulatorOutput, target_states: torch.Tensor,
             mixture_targets: torch.Tensor | None = None, mixture_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """{'loss', 'state_loss'[, 'mixture_loss']} for emulator training."""
        state_loss = emulation_loss(output.states, target_states)
        result = {"state_loss": state_loss, "loss": state_loss}
        if output.mixture_logits is not None and mixture_targets is not None:
            mixture_loss = F.cross_entropy(output.mixture_logits.flatten(0, 1).float(), mixture_targets.flatten())
            result["mixture_loss"] = mixture_loss
            result["loss"] = state_loss + mixture_weight * mixture_loss
        return result
