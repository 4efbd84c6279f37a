"""A method declared outside the `icot` package, as a lab's plug-in would be (`ICOT_PLUGINS=tests.toy_method`).

`toy_curriculum` has one stage, `toy_stage`, which starts from the shared teacher's export (read under the
role `start`) and fine-tunes it on the with-CoT view while a schedule removes CoT tokens from the left:
every `toy_curriculum.every` optimizer steps it removes `toy_curriculum.remove` more, plus 0 or 1 drawn
from a generator that lives in the schedule's state (so a resumed run must restore it to train on the
same batches); from step `toy_curriculum.decay_from` on, its learning rate decays to 0. Its mode `toy` answers like explicit CoT (the model writes what CoT it still has, then
the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icot.config import option
from icot.curriculum import final_decay_factor
from icot.data.collate import view_ids
from icot.evaluate import DecoderModel
from icot.models.generation import generate_explicit
from icot.models.io import load_component
from icot.registry import Method, Mode, StageSpec, register
from icot.stage import Stage, StepUpdate, lm_metrics, prepare_decoder, unwrap


@dataclass
class ToyConfig:
    every: int = option(2, minimum=1, help="optimizer steps between removals")
    remove: int = option(1, minimum=0, help="CoT tokens removed at each removal, before the random extra")
    decay_from: int = option(0, minimum=0, help="from this optimizer step on, the learning rate falls linearly to 0 "
                                                "at the run's end (0: never)")


class ToyStage(Stage):
    generation_target = "cot"

    def __init__(self, config, strategy, tokenizer):
        super().__init__(config, strategy, tokenizer)
        self.removed = 0
        self.rng = np.random.default_rng(config.train.seed)   # the same stream on every rank

    def build(self):
        decoder = self.strategy.load_pretrained(lambda: load_component(self.input_export("start"), expect="decoder"))
        return prepare_decoder(decoder, self.config, dropout=self.config.model.dropout)

    def on_step(self, context):
        if context.step % self.config.toy_curriculum.every == 0 and context.step > 0:
            self.removed += self.config.toy_curriculum.remove + int(self.rng.integers(0, 2))
        decay_from = self.config.toy_curriculum.decay_from or None
        return StepUpdate({"removed_tokens": float(self.removed)},
                          lr_scale=final_decay_factor("linear", context.step, decay_from, context.total_steps))

    def state_dict(self):
        return {"removed": self.removed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.removed = state["removed"]
        self.rng.bit_generator.state = state["rng"]

    def collate(self, features):
        """The with-CoT view with the first `removed` CoT tokens cut out (never the separators)."""
        trimmed = []
        for feature in features:
            ids, start = view_ids(feature, "cot"), int(feature["prompt_len"])
            end = ids.index(self.separator_id, start)   # the separator after the CoT
            cut = min(self.removed, end - start)
            trimmed.append(dict(feature, cot_ids=ids[:start] + ids[start + cut:]))
        return {"cot": self.collate_view(trimmed, "cot")}

    def loss(self, model, batch):
        cot = batch["cot"]
        output = model(input_ids=cot["input_ids"], attention_mask=cot["attention_mask"], labels=cot["labels"])
        return lm_metrics(output, cot["labels"])

    def generate(self, model, features, synced):
        batch, cap = self.generation_batch(features)
        return generate_explicit(unwrap(model), batch, self.separator_id, cap, synced)


class ToyModel(DecoderModel):
    def generate(self, batch, max_new_tokens, synced=False):
        return generate_explicit(self.model, batch, self.separator_id, max_new_tokens, synced, self.decoding)


METHOD = register(Method(
    name="toy_curriculum",
    title="toy curriculum (a test plug-in)",
    section=ToyConfig,
    stages=(StageSpec("toy_stage", "tests.toy_method:ToyStage", "the teacher with its CoT removed step by step",
                      reads={"start": "teacher"}, views=("cot",),
                      mode=Mode("toy", "Toy curriculum", "cot", "tests.toy_method:ToyModel")),),
))
