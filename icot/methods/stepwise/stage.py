"""Stepwise internalization: a decoder fine-tuned on the with-CoT view while the removal schedule
(`schedule.py`) cuts its CoT from the left, until it answers right after the input.
Trained: the decoder, dropout as model.dropout (GPT-2's 0.1 in the reference). Frozen: nothing.
Loss: cross-entropy on what is left of the CoT and the answer. Validation measures the loss and token
accuracy at the current removal (no random offsets) and with the whole CoT removed, and decodes from
the prompt (like explicit CoT: until two separators); once no CoT is left, `best` follows its accuracy.
With `keep_position` (the reference's --keep_position, GPT-2 only as there) the tokens left keep their
positions (icot/models/positions.py). The reference's decoding ignores it (its generate.py does not pass
positions); icot decodes with the shift the example's removal gives, and an export records the final
removal's (the mean CoT length once everything is removed) for `icot eval`."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from icot.data.collate import as_list, second_separator
from icot.errors import UserError
from icot.methods.stepwise.schedule import RemovalSchedule, removal_count, remove_cot
from icot.models.generation import generate_explicit, room_after
from icot.models.io import load_component
from icot.models.positions import position_embedding, shifted_positions
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
    curriculum_scalar = "removed_tokens"

    def __init__(self, config, strategy, tokenizer):
        super().__init__(config, strategy, tokenizer)
        self.options = config.stepwise
        if self.options.keep_position and self.options.side != "left":
            raise UserError("stepwise.keep_position: supported with stepwise.side left only (inference would "
                            "have to shift positions inside the CoT it writes)")
        self.schedule = RemovalSchedule(self.options, config.train.seed)
        self.removals: dict[int, float] = {}     # this step's examples: tokens each removes
        self.evaluating: float | None = None     # the removal validation measures (None: the schedule's)

    @classmethod
    def roles_read(cls, config):
        return ("start",) if config.stepwise.start == "teacher" else ()

    def build(self):
        dropout = self.config.model.dropout
        if self.options.start == "teacher":
            decoder = self.strategy.load_pretrained(lambda: load_component(self.input_export("start"), expect="decoder"))
            decoder = prepare_decoder(decoder, self.config, dropout)
        else:
            decoder = fresh_decoder(self.config, self.tokenizer, dropout=dropout, strategy=self.strategy)
        self.check_decoder(decoder)
        return decoder

    def prepare_train_set(self, train_set):
        self.cot_lengths = cot_lengths(train_set, self.separator_id)
        return train_set

    def check_decoder(self, decoder):
        if self.options.keep_position:
            position_embedding(decoder)   # refuses decoders without learned absolute positions

    def check_data(self, train_set, valid_set, limit, log):
        """Besides the rows: settings that would train nothing like stepwise internalization on this data."""
        super().check_data(train_set, valid_set, limit, log)
        from icot.data.views import list_lengths
        from icot.loop import total_steps

        steps, per_epoch = total_steps(self.config, len(train_set))
        pretrain = self.options.pretrain_epochs
        if pretrain and pretrain * per_epoch >= steps:
            raise UserError(f"stepwise.pretrain_epochs: {pretrain} epoch(s) of {per_epoch} steps before the removal "
                            f"starts, but the run trains {steps} steps (train.max_steps / train.epochs): nothing "
                            f"would be removed")
        limit = self.options.max_length
        if limit is not None:
            lengths = list_lengths(train_set, "cot_ids")
            if limit < lengths.min():
                raise UserError(f"stepwise.max_length: {limit} is shorter than every training example (the "
                                f"shortest has {int(lengths.min())} tokens with its CoT): each batch would train "
                                f"one example until the removal makes them fit; raise it or leave it null")

    def final_position_shift(self) -> int:
        """The shift inference applies with keep_position: the tokens the final schedule removes, the
        training set's mean CoT length (rounded) once that is everything (exact for multiplication,
        whose CoT length is fixed)."""
        mean = int(round(float(np.mean(self.cot_lengths))))
        return mean if math.isinf(self.schedule.scheduled) else min(int(self.schedule.scheduled), mean)

    def export_extra(self) -> dict:
        extra = super().export_extra()
        longest = int(self.cot_lengths.max()) if len(self.cot_lengths) else 0
        removed = min(self.schedule.scheduled, longest)
        extra["curriculum"] = {"final": removed >= longest,
                               "at": f"{int(removed)} of its {longest} CoT tokens removed"}
        if self.options.keep_position:
            extra.update(keep_position=True, position_shift=self.final_position_shift())
        return extra

    # -- the schedule ------------------------------------------------------------------------------
    def on_step(self, context):
        update, self.removals = self.schedule.advance(context, self.cot_lengths)
        return update

    def after_step(self, record):
        self.schedule.observe(record["loss"])

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
            to_remove = self.to_remove(feature)
            trimmed.append(dict(feature, cot_ids=remove_cot(ids, prompt_len, second, to_remove, self.options.side),
                                removed=removal_count(prompt_len, second, to_remove)))
        limit = self.options.max_length
        if limit is not None:
            fitting = [f for f in trimmed if len(f["cot_ids"]) <= limit]
            trimmed = fitting or [min(trimmed, key=lambda f: len(f["cot_ids"]))]
        batch = self.collate_view(trimmed, "cot")
        batch["removed"] = torch.tensor([f["removed"] for f in trimmed], device=batch["input_ids"].device)
        return {"cot": batch}

    def kept_positions(self, model, first_sep, removed):
        """With keep_position, the positions the removed tokens had stay taken; else nothing changes."""
        if not self.options.keep_position:
            return nullcontext()
        return shifted_positions(unwrap(model), first_sep, removed)

    def loss(self, model, batch):
        cot = batch["cot"]
        with self.kept_positions(model, cot["first_sep"], cot["removed"]):
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
        spans = [(int(f["prompt_len"]), second_separator(as_list(f["cot_ids"]), int(f["prompt_len"])))
                 for f in features]
        # The cap covers what the model may still write of its CoT: the longest CoT left plus the answer.
        longest_cot = max(second - prompt_len for prompt_len, second in spans)
        removed = torch.tensor([removal_count(prompt_len, second, self.to_remove(f))
                                for (prompt_len, second), f in zip(spans, features)])
        # The prompt is left-padded: its separator's position is the last column's. Kept positions move
        # every new token `removed` further: no more may come than the positions hold.
        separators = batch["position_ids"][:, -1]
        room = room_after(unwrap(model), separators + 1 + removed) if self.options.keep_position else cap + longest_cot
        with self.kept_positions(model, separators, removed):
            return generate_explicit(unwrap(model), batch, self.separator_id, min(cap + longest_cot, room), synced)
