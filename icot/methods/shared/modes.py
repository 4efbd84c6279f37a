"""The modes of the shared stages: a plain decoder answering directly (no-CoT) or after writing its
CoT (explicit CoT, the teacher)."""

from icot.evaluate import DecoderModel
from icot.models.generation import generate_explicit, generate_no_cot


class NoCotModel(DecoderModel):
    def generate(self, batch, max_new_tokens, synced=False):
        return generate_no_cot(self.model, batch, self.separator_id, max_new_tokens, synced, self.decoding)


class ExplicitModel(DecoderModel):
    def generate(self, batch, max_new_tokens, synced=False):
        return generate_explicit(self.model, batch, self.separator_id, max_new_tokens, synced, self.decoding)
