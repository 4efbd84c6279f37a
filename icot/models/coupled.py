"""Emulator and student coupled: predicted states go through the student's MLPs into the student."""

from __future__ import annotations

import torch
from torch import nn

from icot.errors import UserError
from icot.models.emulator import Emulator
from icot.models.student import Student

PARTS = ("student", "emulator")   # a CoupledModel's components: its attributes and its export's folders


def check_compatible(**components: nn.Module) -> None:
    """Teacher, student and emulator must share depth and width: one state per layer, of width H."""
    shapes = {name: (module.num_layers, module.hidden_size) if hasattr(module, "num_layers")
              else _decoder_shape(module) for name, module in components.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} has {layers} layers x {hidden} hidden"
                              for name, (layers, hidden) in shapes.items())
        raise UserError(f"shape mismatch: {described}; they must match")


def _decoder_shape(module: nn.Module) -> tuple[int, int]:
    from icot.models.decoder import decoder_shape

    return decoder_shape(module)


class CoupledModel(nn.Module):
    def __init__(self, emulator: Emulator, student: Student):
        super().__init__()
        check_compatible(emulator=emulator, student=student)
        self.emulator = emulator
        self.student = student

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_sep: torch.Tensor,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """Answer loss of the student fed with the emulator's states. The emulator reads the input only,
        through the last separator of the batch: it is causal, so its states at the separator depend on
        nothing after it (the reference code fed it the whole sequence, the same states for more work)."""
        prompt = int(first_sep.max()) + 1
        states = self.emulator(input_ids[:, :prompt], attention_mask[:, :prompt], first_sep,
                               position_ids=None if position_ids is None else position_ids[:, :prompt]).states
        return self.student(input_ids, attention_mask, first_sep, states, labels=labels)
