"""Stepwise internalization's mode: the fine-tuned decoder answers from the prompt, writing what CoT it
still has (none, once internalized: `<sep> #### answer <sep>`), stopped after two separators. An export
trained with `keep_position` records the shift its positions take from the separator on
(`position_shift` in icot_component.json), and is decoded and teacher-forced with it."""

from contextlib import nullcontext

import torch

from icot.evaluate import DecoderModel
from icot.models.generation import generate_explicit, room_after
from icot.models.io import read_description
from icot.models.positions import shifted_positions


class StepwiseModel(DecoderModel):
    @property
    def position_shift(self) -> int | None:
        if self.folder is None:
            return None
        return read_description(self.folder).get("position_shift")

    @property
    def added_positions(self) -> int:
        return self.position_shift or 0   # every position from the separator on moves this much further

    def kept_positions(self, separator_positions: torch.Tensor):
        shift = self.position_shift
        if shift is None:
            return nullcontext()
        return shifted_positions(self.model, separator_positions, torch.full_like(separator_positions, shift))

    def generate(self, batch, max_new_tokens, synced=False):
        # Left-padded prompts: the separator's position is the last column's; kept positions move every
        # new token `position_shift` further, so fewer fit in the positions.
        separators = batch["position_ids"][:, -1]
        if self.position_shift:
            max_new_tokens = min(max_new_tokens, room_after(self.model, separators + 1 + self.position_shift))
        if self.position_shift and self.decoding != "eager":   # the shift in the positions the step is given
            return generate_explicit(self.model, batch, self.separator_id, max_new_tokens, synced, self.decoding,
                                     prompt_context=lambda: self.kept_positions(separators),
                                     step_offset=self.position_shift)
        with self.kept_positions(separators):
            return generate_explicit(self.model, batch, self.separator_id, max_new_tokens, synced, self.decoding)

    @torch.no_grad()
    def logits(self, batch):
        with self.kept_positions(batch["first_sep"]):
            return super().logits(batch)
