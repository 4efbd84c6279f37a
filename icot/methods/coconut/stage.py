"""Coconut: a decoder trained on the stage-k sequences (`sequences.py`), its thoughts fed back through the
multi-pass forward (`icot.models.thoughts`), the curriculum in `schedule.py`.
Trained: the decoder, dropout as model.dropout. Frozen: nothing. Loss: token-mean cross-entropy over
what follows the end-of-thought token (coconut.py:185-191). Validation measures the loss at the
current stage and decodes after min(stage, max_latent_stage) x c thoughts; `best` follows accuracy
once every step is latent (stage > max_latent_stage).
The three tokens join the tokenizer, which the exports carry; the token tables grow to fit them
(never shrink: a padded vocabulary keeps its rows) and, with token_init copy, their rows copy
coconut.init_token's."""

from __future__ import annotations

from torch import nn

from icot.data.collate import collate_generate, collate_thoughts, to_device, view_ids
from icot.errors import UserError
from icot.methods.coconut.schedule import CoconutSchedule
from icot.methods.coconut.sequences import (THOUGHT_TOKENS, add_thought_tokens, inference_thoughts,
                                            most_thoughts, stage_sequence, thought_count,
                                            with_thoughts)
from icot.models.generation import generate_with_thoughts
from icot.models.thoughts import copy_token_rows, thought_forward, token_tables
from icot.stage import Stage, shifted_lm_metrics, start_decoder


class CoconutStage(Stage):
    generation_target = "cot"   # at early stages the model still writes the steps left
    curriculum_scalar = "coconut_stage"
    row_keys = ("coconut.thoughts_per_step", "coconut.max_latent_stage")
    uses_steps = True

    def __init__(self, config, strategy, tokenizer):
        super().__init__(config, strategy, tokenizer)
        self.options = config.coconut
        self.base_vocabulary = len(tokenizer)
        self.tokens = add_thought_tokens(tokenizer)
        self.init_id = None
        if self.options.token_init == "copy":
            self.init_id = tokenizer.convert_tokens_to_ids(self.options.init_token)
            if self.init_id is None or self.init_id == tokenizer.unk_token_id or self.init_id >= self.base_vocabulary:
                raise UserError(f"coconut.init_token: {self.options.init_token!r} is not a token of the tokenizer; "
                                f"name one that is (GPT-2: '<<'; a word-level multiplication tokenizer: '+') or "
                                f"set coconut.token_init: resize")
        self.schedule = CoconutSchedule(self.options, config.train.seed)

    @classmethod
    def roles_read(cls, config):
        return ("start",) if config.coconut.start == "teacher" else ()

    def build(self):
        decoder = start_decoder(self, self.options.start == "teacher", self.config.model.dropout)
        if self.init_id is not None:
            with self.strategy.gathered_params(nn.ModuleList(token_tables(decoder)), modify=True):
                copy_token_rows(decoder, [self.tokens.start, self.tokens.end, self.tokens.latent], self.init_id)
        return decoder

    def longest_row(self, feature):
        """The longest of its stage sequences over the curriculum, from the run's first stage (stage 0 where
        uniform_prob draws earlier ones) to the one where every step is latent."""
        first = 0 if self.options.uniform_prob > 0 else self.schedule.stage_of(0)
        rows = [(len(stage_sequence(feature, stage, self.options, self.tokens)[0]), stage)
                for stage in range(first, self.options.max_latent_stage + 2)]
        length, stage = max(rows, key=lambda row: row[0])   # the first stage that long
        thoughts = thought_count(stage, len(feature["step_starts"]), self.options)[1]
        return length, f"its stage-{stage} Coconut sequence ({thoughts} thoughts and 2 markers)"

    def export_extra(self) -> dict:
        extra = super().export_extra()
        extra["coconut"] = {"thoughts": inference_thoughts(self.schedule.stage, self.options),
                            "stage": self.schedule.stage, "tokens": list(THOUGHT_TOKENS)}
        last = self.options.max_latent_stage + 1   # every step latent
        extra["curriculum"] = {"final": self.schedule.stage >= last,
                               "at": f"stage {min(self.schedule.stage, last)} of {last}"}
        return extra

    # -- the curriculum ----------------------------------------------------------------------------
    def on_step(self, context):
        return self.schedule.advance(context)

    def state_dict(self):
        return self.schedule.state_dict()

    def load_state_dict(self, state):
        if state:
            self.schedule.load_state_dict(state)

    def collate(self, features):
        sequences, label_starts = [], []
        for feature in features:
            stage = self.schedule.example_stage(feature)
            ids, label_start = stage_sequence(feature, stage, self.options, self.tokens)
            sequences.append(ids)
            label_starts.append(label_start)
        batch = collate_thoughts(sequences, label_starts, self.tokens.latent, self.separator_id)
        return {"cot": to_device(batch, self.strategy.device)}

    def loss(self, model, batch):
        return shifted_lm_metrics(self.thought_pass(model, batch).logits, batch["cot"]["labels"])

    def thought_pass(self, model, batch):
        """The multi-pass forward over the stage sequences (its thoughts filled in `inputs_embeds`)."""
        cot = batch["cot"]
        return thought_forward(model, cot["input_ids"], cot["attention_mask"], cot["position_ids"], self.tokens.latent,
                               passes=most_thoughts(self.schedule.stage, self.options))

    # -- validation --------------------------------------------------------------------------------
    def selection_score(self, validation):
        """Accuracy, once every step is latent (earlier stages still write part of their CoT)."""
        return validation.get("accuracy") if self.schedule.stage > self.options.max_latent_stage else None

    def generate(self, model, features, synced):
        thoughts = inference_thoughts(self.schedule.stage, self.options)
        prompts = to_device(collate_generate(features, self.separator_id), self.strategy.device)
        batch = with_thoughts(prompts, thoughts, self.tokens)
        cap = max(len(view_ids(f, "cot")) - int(f["prompt_len"]) for f in features) + 4
        return generate_with_thoughts(model, batch, self.tokens.latent, self.separator_id, 2, cap, synced)
