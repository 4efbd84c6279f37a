"""Stepwise internalization: a decoder fine-tuned on the with-CoT view while the removal schedule
(`schedule.py`) cuts its CoT from the left, until it answers right after the input.
Trained: the decoder, dropout as model.dropout (GPT-2's 0.1 in the reference). Frozen: nothing.
Loss: cross-entropy on what is left of the CoT and the answer. Validation measures the loss and token
accuracy at the current removal (no random offsets) and with the whole CoT removed, and decodes from
the prompt (like explicit CoT: until two separators); once no CoT is left, `best` follows its accuracy."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from icot.data.collate import as_list, second_separator
from icot.methods.stepwise.schedule import RemovalSchedule, remove_cot
from icot.models.generation import generate_explicit
from icot.models.io import load_component
from icot.stage import Stage, fresh_decoder, lm_metrics, prepare_decoder, unwrap


def cot_lengths(dataset, separator_id: int) -> np.ndarray:
    """CoT tokens of every example (between the first separator and the second), from the Arrow columns
    without building Python lists of every id."""
    import pyarrow.compute as pc

    column = dataset.data.column("cot_ids").combine_chunks()
    offsets, values = np.asarray(column.offsets), np.asarray(pc.list_flatten(column))
    prompt = np.asarray(dataset.data.column("prompt_len"))
    separators = np.flatnonzero(values == separator_id)
    rows = np.searchsorted(offsets, separators, side="right") - 1
    local = separators - offsets[rows]
    after = local >= prompt[rows]   # the separators after the prompt's own
    rows, local = rows[after], local[after]
    first_rows, first = np.unique(rows, return_index=True)
    lengths = np.empty(len(prompt), dtype=np.int64)
    lengths[first_rows] = local[first] - prompt[first_rows]
    if dataset._indices is not None:
        lengths = lengths[np.asarray(dataset._indices.column(0))]
    return lengths


class StepwiseStage(Stage):
    generation_target = "cot_removed"

    def __init__(self, config, strategy, tokenizer):
        super().__init__(config, strategy, tokenizer)
        self.options = config.stepwise
        self.schedule = RemovalSchedule(self.options, config.train.seed)
        self.removals: dict[int, float] = {}     # this step's examples: tokens each removes
        self.evaluating: float | None = None     # the removal validation measures (None: the schedule's)

    def build(self):
        dropout = self.config.model.dropout
        if self.options.start == "teacher":
            decoder = self.strategy.load_pretrained(lambda: load_component(self.input_export("start"), expect="decoder"))
            return prepare_decoder(decoder, self.config, dropout)
        return fresh_decoder(self.config, self.tokenizer, dropout=dropout, strategy=self.strategy)

    def prepare_train_set(self, train_set):
        self.cot_lengths = cot_lengths(train_set, self.separator_id)
        return train_set

    # -- the schedule ------------------------------------------------------------------------------
    def on_step(self, context):
        update, self.removals = self.schedule.advance(context, self.cot_lengths)
        return update

    def state_dict(self):
        return self.schedule.state_dict()

    def load_state_dict(self, state):
        if state:
            self.schedule.load_state_dict(state)

    def to_remove(self, feature: dict) -> float:
        if self.evaluating is not None:
            return self.evaluating
        if "index" in feature:   # a training example: the schedule's decision, offset included
            return self.removals.get(feature["index"], 0)
        return self.schedule.scheduled   # validation: the current removal, no offset

    def collate(self, features):
        """The with-CoT view with each example's removal applied (stepwise.max_length drops what is
        still too long, keeping at least the shortest example)."""
        trimmed = []
        for feature in features:
            ids, prompt_len = as_list(feature["cot_ids"]), int(feature["prompt_len"])
            second = second_separator(ids, prompt_len)
            trimmed.append(dict(feature, cot_ids=remove_cot(ids, prompt_len, second, self.to_remove(feature),
                                                            self.options.side)))
        limit = self.options.max_length
        if limit is not None:
            fitting = [f for f in trimmed if len(f["cot_ids"]) <= limit]
            trimmed = fitting or [min(trimmed, key=lambda f: len(f["cot_ids"]))]
        return {"cot": self.collate_view(trimmed, "cot")}

    def loss(self, model, batch):
        cot = batch["cot"]
        output = model(input_ids=cot["input_ids"], attention_mask=cot["attention_mask"], labels=cot["labels"])
        return lm_metrics(output, cot["labels"])

    # -- validation --------------------------------------------------------------------------------
    @contextmanager
    def _removing(self, tokens: float | None):
        self.evaluating = tokens
        try:
            yield
        finally:
            self.evaluating = None

    def validation_settings(self):
        return {"": self._removing(None), "_all_removed": self._removing(math.inf)}

    def selection_score(self, validation):
        """Accuracy, once the schedule has removed the whole CoT (the reference keeps no best before)."""
        return validation.get("accuracy") if self.schedule.all_removed_before else None

    def generate(self, model, features, synced):
        batch, cap = self.generation_batch(features)
        # The cap covers what the model may still write of its CoT: the longest CoT left plus the answer.
        longest_cot = max(second_separator(as_list(f["cot_ids"]), int(f["prompt_len"])) - int(f["prompt_len"])
                          for f in features)
        return generate_explicit(unwrap(model), batch, self.separator_id, cap + longest_cot, synced)
