"""Stepwise internalization's mode: the fine-tuned decoder answers from the prompt, writing what CoT it
still has (none, once internalized: `<sep> #### answer <sep>`), stopped after two separators."""

from icot.evaluate import DecoderModel
from icot.models.generation import generate_explicit


class StepwiseModel(DecoderModel):
    def generate(self, batch, max_new_tokens, synced=False):
        return generate_explicit(self.model, batch, self.separator_id, max_new_tokens, synced)
