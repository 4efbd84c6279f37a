"""Coconut's mode: the decoder reads the prompt, the start token, its continuous thoughts and the end
token, then writes `<sep> #### answer <sep>` (batched, one KV cache from the thoughts through the
answer). The number of thoughts is the export's (`coconut.thoughts` in icot_component.json: the final
stage's). Teacher-forced token accuracy runs the same thought passes before the reference answer."""

from __future__ import annotations

import torch

from icot.data.collate import collate_thoughts
from icot.errors import UserError
from icot.evaluate import DecoderModel
from icot.methods.coconut import CoconutConfig
from icot.methods.coconut.sequences import (ThoughtTokens, add_thought_tokens,
                                            inference_thoughts, with_thoughts)
from icot.models.generation import generate_with_thoughts, reference_thought_decode
from icot.models.io import read_description
from icot.models.thoughts import thought_forward


class CoconutModel(DecoderModel):
    def __init__(self, mode, model, tokenizer, folder=None, thoughts: int | None = None):
        super().__init__(mode, model, tokenizer, folder)
        self.tokens = ThoughtTokens.of(tokenizer)
        if thoughts is None and folder is None:   # a random model (`icot bench`): the defaults' final stage
            defaults = CoconutConfig()
            thoughts = inference_thoughts(defaults.max_latent_stage + 1, defaults)
        if thoughts is None:
            thoughts = read_description(folder).get("coconut", {}).get("thoughts")
        if thoughts is None:
            raise UserError(f"{folder}: not a Coconut export (icot_component.json records no coconut.thoughts)")
        self.thoughts = int(thoughts)

    @property
    def added_positions(self):
        return self.thoughts + 2

    @classmethod
    def holds(cls, folder):
        return super().holds(folder) and "coconut" in read_description(folder)

    @classmethod
    def prepare_tokenizer(cls, tokenizer) -> None:
        add_thought_tokens(tokenizer)

    def generate(self, batch, max_new_tokens, synced=False):
        inputs = with_thoughts(batch, self.thoughts, self.tokens)
        return generate_with_thoughts(self.model, inputs, self.tokens.latent, self.separator_id, 2, max_new_tokens,
                                      synced, decoding=self.decoding)

    def generate_as_reference(self, batch, max_new_tokens):
        """The reference code's decoding of the same inputs: one example at a time, no KV cache after the
        thoughts (`icot bench` times it beside `generate`)."""
        inputs = with_thoughts(batch, self.thoughts, self.tokens)
        return [reference_thought_decode(self.model, ids[mask.bool()].tolist(), self.tokens.latent, self.separator_id,
                                         2, max_new_tokens)
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]

    @torch.no_grad()
    def logits(self, batch):
        """Logits at the columns of the right-padded `batch` (the without-CoT-removed view): each row runs
        as `prompt <start> thoughts <end> rest`, and the end token's logits stand at the prompt's
        separator, which predicts what follows it."""
        lengths, firsts = batch["attention_mask"].sum(dim=1).tolist(), batch["first_sep"].tolist()
        sequences = []
        for row, (length, first) in enumerate(zip(lengths, firsts)):
            ids = batch["input_ids"][row, :length].tolist()
            sequences.append(ids[:first + 1] + [self.tokens.start] + [self.tokens.latent] * self.thoughts
                             + [self.tokens.end] + ids[first + 1:])
        thought_batch = {key: value.to(batch["input_ids"].device) for key, value in
                         collate_thoughts(sequences, None, self.tokens.latent, self.separator_id).items()}
        logits = thought_forward(self.model, thought_batch["input_ids"], thought_batch["attention_mask"],
                                 thought_batch["position_ids"], self.tokens.latent, use_cache=True).logits
        out = logits.new_zeros(batch["input_ids"].shape + (logits.size(-1),))
        added = self.thoughts + 2
        for row, (length, first) in enumerate(zip(lengths, firsts)):
            left = int(thought_batch["left_padding"][row])
            out[row, :first] = logits[row, left:left + first]
            out[row, first] = logits[row, left + first + added]   # the end token's
            out[row, first + 1:length] = logits[row, left + first + 1 + added:left + length + added]
        return out

