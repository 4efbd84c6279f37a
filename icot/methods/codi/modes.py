"""CODI's mode: the merged decoder reads the prompt and `<|bot|>`, then its continuous thoughts (each the
projection of the previous last hidden state), `<|eot|>`, and writes `<sep> #### a <sep>`, batched with
one KV cache (codi:test.py:167-316, which decodes a left-padded batch too). The number of thoughts,
the projection's shape and the masking are the export's (`codi` in icot_component.json). Teacher-forced
token accuracy runs the same passes before the reference answer."""

from __future__ import annotations

from dataclasses import replace

import torch

from icot.data.collate import collate_thoughts
from icot.errors import UserError
from icot.evaluate import ModeModel
from icot.methods.codi import CodiConfig
from icot.methods.codi.model import PROJECTION_FILE, CodiModel, build_projection, load_codi_export
from icot.methods.codi.sequences import CodiTokens, add_codi_tokens, inference_batch, reference_layout
from icot.models.decoder import decoder_shape
from icot.models.generation import generate_with_thoughts
from icot.models.io import read_description
from icot.models.thoughts import thought_forward


def export_options(folder) -> CodiConfig:
    recorded = read_description(folder).get("codi")
    if recorded is None:
        raise UserError(f"{folder}: not a CODI export (icot_component.json records no codi section)")
    return replace(CodiConfig(), latents=int(recorded["latents"]), projection_dim=int(recorded["projection_dim"]),
                   projection_norm=bool(recorded["projection_norm"]),
                   reference_masking=bool(recorded["reference_masking"]))


class CodiModeModel(ModeModel):
    def __init__(self, mode, model, tokenizer, folder=None, options: CodiConfig | None = None):
        super().__init__(mode, model, tokenizer, folder)
        self.options = options or (export_options(folder) if folder is not None else CodiConfig())
        self.tokens = CodiTokens.of(tokenizer)

    @property
    def decoder(self):
        return self.model.base

    @property
    def added_positions(self):
        return self.options.latents + 2

    @classmethod
    def holds(cls, folder):
        return (folder / PROJECTION_FILE).is_file() and "codi" in read_description(folder)

    @classmethod
    def load(cls, folder):
        from icot.data.tokenizer_build import load_tokenizer

        return load_codi_export(folder, export_options(folder)), load_tokenizer(folder, "the export")

    @classmethod
    def prepare_tokenizer(cls, tokenizer) -> None:
        add_codi_tokens(tokenizer)

    @classmethod
    def random_model(cls, random_decoder):
        decoder = random_decoder(0)
        return CodiModel(decoder, build_projection(decoder_shape(decoder)[1], CodiConfig()))

    def generate(self, batch, max_new_tokens, synced=False):
        inputs = inference_batch(batch, self.options.latents, self.tokens, self.options.reference_masking)
        return generate_with_thoughts(self.model, inputs, self.tokens.latent, self.separator_id, 2, max_new_tokens,
                                      synced, feedback=self.model.projection, suppress=self.tokens.never_generated,
                                      decoding=self.decoding)

    @torch.no_grad()
    def logits(self, batch):
        """Logits at the columns of the right-padded `batch` (the CoT-removed view `q <sep> <sep> #### a
        <sep>`): each row runs as `q <sep> <|bot|> thoughts <|eot|> rest`; the `<|eot|>` logits stand at
        the prompt's separator, which predicts what follows it."""
        lengths, firsts = batch["attention_mask"].sum(dim=1).tolist(), batch["first_sep"].tolist()
        added = [self.tokens.bot] + [self.tokens.latent] * self.options.latents + [self.tokens.eot]
        sequences = []
        for row, (length, first) in enumerate(zip(lengths, firsts)):
            ids = batch["input_ids"][row, :length].tolist()
            sequences.append(ids[:first + 1] + added + ids[first + 1:])
        rows = collate_thoughts(sequences, None, self.tokens.latent, self.separator_id)
        if self.options.reference_masking:
            rows = reference_layout(rows)
        rows = {key: value.to(batch["input_ids"].device) for key, value in rows.items()}
        logits = thought_forward(self.model, rows["input_ids"], rows["attention_mask"], rows["position_ids"],
                                 self.tokens.latent, use_cache=True, feedback=self.model.projection,
                                 later_mask=rows.get("later_mask")).logits
        out = logits.new_zeros(batch["input_ids"].shape + (logits.size(-1),))
        for row, (length, first) in enumerate(zip(lengths, firsts)):
            left = int(rows["left_padding"][row])
            out[row, :first] = logits[row, left:left + first]
            out[row, first] = logits[row, left + first + len(added)]   # <|eot|>'s
            out[row, first + 1:length] = logits[row, left + first + 1 + len(added):left + length + len(added)]
        return out
